"""Write outputs to a temporary file beside the target, then rename: a reader never sees half a file.

A run stopped by Ctrl-C, `kill` (SIGTERM) or a closed terminal (SIGHUP) removes its temporary file on the way out
(the commands turn those signals into SystemExit: see cli_errors.py). A run killed with SIGKILL cannot; its temporary
file is named `.<target>.scl-tmp-<host>-<pid>-<random>`, and the next write to the same target removes those whose
process is gone (on this host: a shared file system may hold live ones of other machines).
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path

from .cli_errors import raise_if_stopped
from .errors import SclError

_UMASK = os.umask(0)
os.umask(_UMASK)
MARK = ".scl-tmp-"
log = logging.getLogger("scl")


def _host() -> str:
    return "".join(c if c.isalnum() else "_" for c in socket.gethostname())[:40] or "host"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temporaries(path: Path) -> list[str]:
    """Remove this host's temporary files for `path` whose process no longer runs; returns their names."""
    removed = []
    prefix = f".{path.name}{MARK}{_host()}-"
    for stale in glob.glob(os.path.join(glob.escape(str(path.parent)), glob.escape(prefix) + "*")):
        pid = Path(stale).name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(stale) if os.path.isdir(stale) and not os.path.islink(stale) else os.unlink(stale)
                removed.append(stale)
    if removed:
        log.warning(f"removed {len(removed)} temporary file(s) left by a killed run: {', '.join(removed)}")
    return removed


@contextlib.contextmanager
def atomic_path(path, suffix: str = ""):
    """Yields a temporary path in the target's folder; renamed onto `path` only if the block succeeds."""
    path = Path(path)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}{MARK}{_host()}-{os.getpid()}-", suffix=suffix)
    os.close(fd)
    try:
        yield tmp
        raise_if_stopped()  # a stop the signal handler could not raise (see cli_errors.py) must not commit the output
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the user's usual mode
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def refuse_used_folder(path, command: str, finished: tuple[str, str]) -> None:
    """Before any work, for a folder that atomic_folder will replace whole: `path` must be new or an empty folder, so
    that neither a finished result (`finished`: its marker file and what it is) nor anyone's files are lost."""
    path = Path(path)
    marker, what = finished
    if (path / marker).exists():
        raise SclError(f"{path}: already holds {what} ({marker}); choose another --out or delete it first.", "out")
    if path.exists() and not path.is_dir():
        raise SclError(f"{path}: is a file; --out names the folder {command} creates.", "out")
    if path.is_dir() and any(path.iterdir()):
        raise SclError(f"{path}: already holds files; {command} writes a new folder: choose another --out or empty it.", "out")


@contextlib.contextmanager
def atomic_folder(path):
    """Yields a temporary folder beside `path`; it replaces `path` (a folder, or nothing) only if the block succeeds.
    A folder cannot be renamed onto another in one step: the old one is moved aside first, then removed."""
    path = Path(path)
    remove_stale_temporaries(path)
    tmp = tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}{MARK}{_host()}-{os.getpid()}-")
    try:
        yield tmp
        raise_if_stopped()
        os.chmod(tmp, 0o777 & ~_UMASK)
        if path.exists():
            aside = tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}{MARK}{_host()}-{os.getpid()}-old-")
            os.replace(path, os.path.join(aside, path.name))
            os.replace(tmp, path)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
