"""The documentation as a newcomer meets it: the README's command examples run as written, and the reference pages
with the API generated from the docstrings build without a warning."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import BIN

REPO = Path(__file__).resolve().parents[1]
# appended to the README's training commands so that they run in seconds on the test data; the last value of a flag wins
QUICK = {"scl-pretrain": ["--hidden", "64,32", "--latent", "16", "--epochs", "1", "--batch-size", "64"], "scl-train": ["--epochs", "1"]}


def readme_commands() -> list[list[str]]:
    """Each scl command line of the README's bash blocks (continuations joined), in order; scl-serve is left out
    (it runs until stopped: tests/test_serve.py starts a real one)."""
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    commands = []
    for block in blocks:
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            words = shlex.split(line, comments=True)
            if words and words[0].startswith("scl-") and words[0] != "scl-serve":
                commands.append(words)
    return commands


def test_the_readme_command_examples_run_as_written(exported, small_data, tmp_path):
    commands = readme_commands()
    assert [c[0] for c in commands] == ["scl-pretrain", "scl-train", "scl-export", "scl-export", "scl-annotate", "scl-annotate", "scl-annotate",
                                        "scl-annotate", "scl-reference", "scl-annotate", "scl-reference", "scl-train"]
    (tmp_path / "demo_out" / "data").mkdir(parents=True)  # what `make demo` leaves, from the test data
    for name, target in (("model.onnx", exported), ("model.int8.onnx", exported.with_name("model.int8.onnx")),
                         ("data/pbmc_train.h5ad", small_data / "train.h5ad"), ("data/pbmc_heldout.h5ad", small_data / "val.h5ad")):
        (tmp_path / "demo_out" / name).symlink_to(target)
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "demo_data").symlink_to(REPO / "train" / "demo_data")
    for words in commands:
        done = subprocess.run([str(BIN / words[0]), *words[1:], *QUICK.get(words[0], [])], cwd=tmp_path, capture_output=True, text=True)
        assert done.returncode == 0, (words, done.stderr[-2000:])
    for written in ("my_base/encoder.ckpt", "my_run/report.md", "my_streamed_run/report.md", "my_model.onnx", "my_model.int8.onnx", "my_base.onnx", "demo_out/data/pbmc_heldout.scl.h5ad",
                    "calls.csv", "sets.csv", "dask.csv", "pbmc.sclref/reference.json", "knn.csv", "hits.csv"):
        assert (tmp_path / written).is_file(), written
    assert "prediction_set" in (tmp_path / "sets.csv").read_text().split("\n")[0]
    assert "knn_label" in (tmp_path / "knn.csv").read_text().split("\n")[0]


def test_the_docs_build_without_a_warning_and_hold_the_api(tmp_path):
    pytest.importorskip("sphinx")
    pytest.importorskip("myst_parser")
    out = tmp_path / "html"
    done = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", str(REPO / "docs"), str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    api = (out / "api.html").read_text()
    for documented in ("scl.Annotator", "Annotate cells in memory", "scl.runtime.pipeline.Pipeline", "export_run", "TrainingCells", "scl.Reference"):
        assert documented in api, documented
    pages = {p.stem for p in (REPO / "docs").glob("*.md")}
    assert pages <= {p.stem for p in out.glob("*.html")}  # every page is in the build (and the toctree)
    linked = set(re.findall(r"\(docs/([\w-]+)\.md\)", (REPO / "README.md").read_text()))
    assert linked and linked <= pages  # every page the README sends readers to exists


def test_the_readme_layout_names_every_module():
    """The layout table is how a newcomer finds a file: a module missing from it is a module nobody finds."""
    text = (REPO / "README.md").read_text()
    layout = text[text.index("## Layout of the code"):]
    for folder in ("runtime", "train", "export", "scl", "benchmarks"):
        row = next(line for line in layout.splitlines() if line.startswith(f"| `{folder}/`"))
        missing = [p.name for p in (REPO / folder).glob("*.py") if p.name != "__init__.py" and f"`{p.name}`" not in row]
        assert not missing, (folder, missing)
