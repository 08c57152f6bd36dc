"""Crash-safe file writing: write to a temporary file, fsync, then rename over the target.

A reader never sees a half-written file: either the old content or the new one. Temporary files live
in a hidden folder, `.gptlab-tmp`, inside the target's folder: the final rename stays on one filesystem
(and so is atomic), and whatever a killed writer left there -- gptlab's temporary file, or one a
library made beside it while writing through it (safetensors does) -- is removed as a whole by the
next run that holds the folder's lock (`remove_stale_temp_files`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from .. import faults
from ..errors import GptlabError, UsageError


def fsync_dir(path: str | os.PathLike) -> None:
    """Persist a rename: on POSIX a directory entry is only durable once the directory is synced."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


TEMP_DIR = ".gptlab-tmp"
# Temporary files older gptlab versions and libraries left directly in a folder: `.NAME.XXXX.tmp`
# (gptlab) and `.tmpXXXXXX` (safetensors' own atomic write).
_LOOSE_TEMP = re.compile(r"^\..+\.[A-Za-z0-9_]+\.tmp$|^\.tmp[A-Za-z0-9]{6}$")


def _temp_file(target: Path) -> Path:
    folder = target.parent / TEMP_DIR
    for attempt in range(2):  # another writer may remove the (empty) folder between mkdir and mkstemp
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix=f"{target.name}.", suffix=".tmp", dir=folder)
            os.close(fd)
            return Path(name)
        except FileNotFoundError:
            if attempt:
                raise
    raise AssertionError("unreachable")


def _drop_temp_folder(folder: Path) -> None:
    """Remove the temporary folder once it is empty (another writer may still be using it)."""
    with contextlib.suppress(OSError):
        (folder / TEMP_DIR).rmdir()


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path for `target`; on success it is fsynced and renamed onto `target`.

    On any exception the temporary file is removed and `target` is left untouched.
    """
    target = Path(target)
    folder = target.parent if str(target.parent) else Path(".")
    target = folder / target.name
    try:
        tmp = _temp_file(target)
    except OSError as exc:
        raise GptlabError(f"cannot write {target}: {exc.strerror or exc}; choose a writable folder") from exc
    try:
        yield tmp
        # mkstemp creates 0600 files; give the result the permissions a plain open() would.
        os.chmod(tmp, 0o666 & ~_umask())
        faults.during_write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        fsync_dir(folder)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError):
            raise GptlabError(
                f"could not write {target}: {exc.strerror or exc}; free disk space or fix permissions "
                "(the previous file, if any, is intact)"
            ) from exc
        raise
    finally:
        _drop_temp_folder(folder)


@contextlib.contextmanager
def atomic_open(target: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO[Any]]:
    """Open a temporary file for writing that replaces `target` only when the block succeeds."""
    if "b" in mode:
        encoding = None
    with atomic_path(target) as tmp, open(tmp, mode, encoding=encoding) as fh:
        yield fh
        fh.flush()


def read_json(path: str | os.PathLike) -> Any:
    """The JSON value in `path`; a missing, unreadable or invalid file is one UsageError naming it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"cannot read {path}: {exc}") from None


def read_format_file(folder: str | os.PathLike, name: str, fmt: str, missing: str) -> dict:
    """The JSON object `name` in `folder` whose "format" field must be `fmt` (a file that says what a
    folder holds, e.g. classifier.json); `missing` is the error when there is no such file."""
    path = Path(folder) / name
    if not path.is_file():
        raise UsageError(missing)
    info = read_json(path)
    if not isinstance(info, dict) or info.get("format") != fmt:
        raise UsageError(f'{path} is not a {fmt} description (its "format" field must be {fmt!r})')
    return info


def write_json(target: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as indented JSON, atomically."""
    with atomic_open(target, "w") as fh:
        json.dump(obj, fh, indent=2)
        fh.write("\n")


class RunLock:
    """An exclusive lock on a run folder, so two processes never write the same run at once.

    Uses flock on `<folder>/.lock`; the OS drops the lock when the process dies, so a crashed run
    never leaves a stale lock behind.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.path = Path(folder) / ".lock"
        self._fh: IO[str] | None = None

    def acquire(self) -> RunLock:
        try:
            import fcntl
        except ImportError:  # Windows: no flock; running two trainings on one folder is then on the user
            return self
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fh = open(self.path, "a+", encoding="utf-8")
        except OSError as exc:
            raise GptlabError(f"cannot lock {self.path}: {exc.strerror or exc}; choose a writable folder") from None
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise GptlabError(
                f"{self.path.parent} is in use by a running gptlab process (pid {holder}); "
                "wait for it to finish or choose another --out"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        self._fh = fh
        return self

    def release(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def remove_stale_temp_files(folder: str | os.PathLike) -> list[str]:
    """Remove what killed writers left in `folder`: the `.gptlab-tmp` folder and loose temporary files.

    Call it only while holding the folder's RunLock: then no live gptlab process is writing there.
    Returns the names removed.
    """
    folder = Path(folder)
    removed = []
    temp = folder / TEMP_DIR
    if temp.is_dir():
        removed += [f"{TEMP_DIR}/{p.name}" for p in temp.iterdir()]
        shutil.rmtree(temp, ignore_errors=True)
    for path in folder.iterdir() if folder.is_dir() else ():
        if path.is_file() and _LOOSE_TEMP.match(path.name):
            path.unlink(missing_ok=True)
            removed.append(path.name)
    return removed
