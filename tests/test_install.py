"""The runtime installs and runs without torch."""

import os
import pkgutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

import scl.runtime

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def without_torch(tmp_path) -> dict:
    """An environment in which `import torch` (and peft, scimilarity) fails."""
    for name in ("torch", "peft", "scimilarity"):
        (tmp_path / f"{name}.py").write_text(f"raise ImportError('{name} is blocked in this test')\n")
    return {**os.environ, "PYTHONPATH": str(tmp_path)}


def test_runtime_modules_import_without_torch(tmp_path):
    modules = [f"scl.runtime.{m.name}" for m in pkgutil.iter_modules(scl.runtime.__path__)]
    code = "import importlib, sys\n" + "".join(f"importlib.import_module({m!r})\n" for m in modules)
    code += "assert 'torch' not in sys.modules\nprint('ok', len(sys.argv))"
    out = subprocess.run([sys.executable, "-c", code], env=without_torch(tmp_path), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    blocked = subprocess.run([sys.executable, "-c", "import torch"], env=without_torch(tmp_path), capture_output=True, text=True)
    assert "blocked" in blocked.stderr  # the blocker really works


def test_annotate_help_runs_without_torch(tmp_path):
    out = subprocess.run([BIN / "scl-annotate", "--help"], env=without_torch(tmp_path), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "Usage: scl-annotate" in out.stdout


@pytest.mark.skipif(os.environ.get("SCL_SKIP_INSTALL_TEST") == "1", reason="SCL_SKIP_INSTALL_TEST=1")
def test_runtime_only_install_pulls_no_torch(tmp_path):
    """pip install .[cpu] into an empty environment: onnxruntime and no torch, and the command works."""
    env_dir = tmp_path / "env"
    venv.create(env_dir, with_pip=True)
    pip = [env_dir / "bin" / "python", "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    done = subprocess.run([*pip, f"{REPO}[cpu]"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    listed = subprocess.run([env_dir / "bin" / "python", "-m", "pip", "list"], capture_output=True, text=True).stdout.lower()
    assert "onnxruntime " in listed and "torch" not in listed and "onnxruntime-gpu" not in listed
    help_out = subprocess.run([env_dir / "bin" / "scl-annotate", "--help"], capture_output=True, text=True)
    assert help_out.returncode == 0, help_out.stderr
    api = subprocess.run([env_dir / "bin" / "python", "-c", "import scl, sys; print(scl.Annotator.__name__, 'torch' in sys.modules)"],
                         capture_output=True, text=True, cwd=tmp_path)  # not the checkout: the installed package
    assert api.stdout.split() == ["Annotator", "False"], api.stderr
