"""Atomic writes: a reader (and a process killed mid-write) sees the old artifact or the new one,
never a part of one. Every artifact of the pipeline goes through these two:

    building_folder(out)        a folder (tokenizer, packed data, checkpoint, export) built under
                                a temporary name beside `out` and renamed into place when complete
    write_text_atomic(path, s)  one small file (a checkpoint pointer, a search's best.yaml)

Temporary folders are named `.tmp-<name>-<pid>`: hidden from the globs that find artifacts, and
the pid lets the next build in the same folder delete what a killed writer left (SIGKILL runs no
cleanup) without touching a folder that a live concurrent writer is still building.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

from tinyllama.errors import ConfigError


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary name and a rename (atomic on POSIX)."""
    tmp = path.parent / f".{path.name}.tmp"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


@contextlib.contextmanager
def building_folder(
    out: Path, overwrite: bool = False, hint: str = "choose another folder, or allow overwriting it"
) -> Iterator[Path]:
    """An empty folder beside `out` to build an artifact in; it becomes `out` when the block ends
    without an error, and is deleted (leaving `out` as it was) when the block raises.

    An existing non-empty `out` is refused with a ConfigError ending in `hint`, unless overwrite:
    then it is replaced, but only once the new folder is complete. If `out` appears while the
    block runs (a concurrent writer of the same artifact finished first), it is kept unless
    overwrite and ours is dropped: callers check what they find at `out` afterwards.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"{out} already exists and is not empty; it is kept. {hint[0].upper()}{hint[1:]}")
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(out.parent)
    # Made with the umask's permissions: mkdtemp's 0700 would make the artifact private to its writer.
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if overwrite and out.exists():
            shutil.rmtree(out)
        try:
            os.replace(tmp, out)  # onto a missing or empty folder; fails onto a non-empty one
        except OSError:
            if not out.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove_stale(parent: Path) -> None:
    """Delete the temporary folders in `parent` of writers that were killed (their pid is gone),
    e.g. a checkpoint of another step whose save was cut short."""
    for tmp in parent.glob(".tmp-*-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return not _zombie(pid)


def _zombie(pid: int) -> bool:
    """A killed process that nobody reaped yet (in a container whose init does not reap, it stays
    one for good): it answers os.kill but writes nothing any more."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # no /proc (macOS), or it just went
        return False
    return stat.rsplit(")", 1)[-1].split()[0] == "Z"
