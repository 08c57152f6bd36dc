"""The one downloader and the one cache home.

`fetch_file` streams a URL into `DEST.part` with a progress bar. An interrupted download resumes
from the bytes already there (HTTP Range), on the next attempt or the next run; only a complete
file whose size (and sha256, when known) checks out is fsynced and renamed to its final name.
Everything gptlab downloads or builds lives under `gptlab_home()`: `$GPTLAB_HOME`, default
`~/.cache/gptlab` (corpora/, openai/, huggingface/, kernels/).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from ..errors import GptlabError
from .files import fsync_dir

HOME_ENV = "GPTLAB_HOME"
CHUNK = 1 << 20
ATTEMPTS = 3  # tries per file: a dropped connection resumes where it stopped
TIMEOUT_S = 60.0


def gptlab_home() -> Path:
    """gptlab's cache folder: $GPTLAB_HOME, else ~/.cache/gptlab."""
    env = os.environ.get(HOME_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gptlab"


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


class _Interrupted(Exception):
    """The connection ended before the whole file arrived (resumable)."""


def _host(url: str) -> str:
    return urllib.request.urlparse(url).netloc or url


def _open(url: str, start: int, timeout: float, offline_hint: str):
    headers = {"User-Agent": "gptlab"}
    if start:
        headers["Range"] = f"bytes={start}-"
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and start:
            return None  # our partial file is not a prefix the server knows: start over
        raise GptlabError(f"could not download {url}: HTTP {exc.code} {exc.reason}; check the URL or "
                          "try again later") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", exc)
        reason = getattr(reason, "strerror", None) or reason
        raise GptlabError(f"cannot reach {_host(url)} ({reason}); you seem to be offline: check your "
                          f"connection or proxy and try again{offline_hint}") from None


def _fetch_once(url: str, part: Path, expected: int | None, label: str, progress: bool, timeout: float,
                offline_hint: str) -> None:
    """Append the rest of `url` to `part` (or restart it when the server ignores Range)."""
    from tqdm import tqdm

    have = part.stat().st_size if part.exists() else 0
    if expected is not None and have > expected:
        part.unlink()
        have = 0
    resp = _open(url, have, timeout, offline_hint)
    if resp is None:
        part.unlink()
        have = 0
        resp = _open(url, 0, timeout, offline_hint)
    with resp:
        if have and resp.status != 206:
            have = 0  # the server sent the whole file
        length = resp.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        if expected is not None and total is not None and total != expected:
            raise GptlabError(f"{url} is {total} bytes but {label} should be {expected}; the server sent "
                              "another file (a broken mirror or proxy?)")
        with open(part, "ab" if have else "wb") as fh, tqdm(
            total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024, desc=label,
            disable=None if progress else True, file=sys.stderr, leave=False,
        ) as bar:
            while True:
                try:
                    chunk = resp.read(CHUNK)
                except (OSError, http.client.HTTPException) as exc:
                    raise _Interrupted(str(exc) or exc.__class__.__name__) from None
                if not chunk:
                    break
                fh.write(chunk)
                bar.update(len(chunk))
            fh.flush()
            os.fsync(fh.fileno())
    got = part.stat().st_size
    if total is not None and got < total:
        raise _Interrupted(f"connection closed after {got} of {total} bytes")


def fetch_file(url: str, dest: str | os.PathLike, expected_size: int | None = None, sha256: str | None = None,
               *, progress: bool = True, attempts: int = ATTEMPTS, timeout: float = TIMEOUT_S,
               offline_hint: str = "") -> Path:
    """Download `url` to `dest` through `dest.part`, resuming after dropped connections.

    A size or sha256 mismatch deletes the partial file and raises; `offline_hint` is appended to the
    message when the server cannot be reached (e.g. where else the user can get the file).
    """
    # Not files.atomic_path: that deletes its temporary file on failure, and the partial file is
    # exactly what a resumed download needs. The guarantee is the same: fsync, then rename.
    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GptlabError(f"cannot create {dest.parent}: {exc.strerror or exc}; choose a writable folder") from None
    part = dest.with_name(dest.name + ".part")
    for attempt in range(1, attempts + 1):
        try:
            _fetch_once(url, part, expected_size, dest.name, progress, timeout, offline_hint)
            break
        except _Interrupted as exc:
            if attempt == attempts:
                have = part.stat().st_size if part.exists() else 0
                raise GptlabError(f"download of {url} stopped after {have} bytes ({exc}); run the same "
                                  "command again to resume") from None
            time.sleep(0.5 * attempt)
    size = part.stat().st_size
    if expected_size is not None and size != expected_size:
        part.unlink()
        raise GptlabError(f"{dest.name}: got {size} bytes, expected {expected_size}; deleted it, try again")
    if sha256 is not None and (digest := sha256_file(part)) != sha256:
        part.unlink()
        raise GptlabError(f"{dest.name}: the download has sha256 {digest[:12]}..., not the known "
                          f"{sha256[:12]}...; deleted it, try again later (or another mirror)")
    os.replace(part, dest)
    fsync_dir(dest.parent)
    return dest
