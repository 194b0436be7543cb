"""Files in and out: digests, downloads and writes that never leave a half-written file."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import http.client
import logging
import os
import secrets
import shutil
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from .errors import SadagError

log = logging.getLogger(__name__)


def file_digest(path: str | os.PathLike, algo: str = "sha256") -> str:
    """The hex digest of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.new(algo)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def copy_url(url: str, path: str | os.PathLike, error: type[SadagError], hint: str) -> None:
    """Write the body of ``url`` to ``path``; an unreachable URL or a body shorter than its Content-Length (a
    dropped connection, which urllib does not report) raises ``error`` ending in ``hint``."""
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(path, "wb") as f:
            shutil.copyfileobj(r, f)
            expected, got = r.headers.get("Content-Length"), f.tell()
    except (OSError, http.client.HTTPException) as e:
        raise error(f"could not download {url}: {e}; {hint}") from e
    if expected is not None and expected.isdigit() and int(expected) != got:
        raise error(f"could not download {url}: {got} of {expected} bytes arrived; try again, or {hint}")


def fetch(url: str, dest: Path, error: type[SadagError], hint: str) -> None:
    """Download ``url`` to ``dest`` through a temporary file of its own (processes that fetch the same file at
    once, e.g. torchrun's ranks on a fresh machine, never write into each other's)."""
    log.info("downloading %s to %s", url, dest)
    write_atomically(dest, lambda tmp: copy_url(url, tmp, error, hint))


def remove_stale_temporaries(path: Path, max_age_s: float = 86_400.0) -> None:
    """Remove what killed writers of ``path`` left (write_atomically's temporary files, and any file named after
    one) once older than ``max_age_s``: a younger one may belong to a process still writing."""
    now = time.time()
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp*"):
        with contextlib.suppress(OSError):  # another process removed it first
            if now - tmp.stat().st_mtime > max_age_s:
                tmp.unlink()


def write_atomically(path: Path, write: Callable[[str], object]) -> None:
    """``write(tmp)`` to a temporary file in the same folder, then os.replace: never a half-written file under
    ``path``, and an earlier file there survives a failed write. The file gets the mode open() would give."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = str(path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp")
    # created as open() would (mode 0666 less the umask); mkstemp's 0600 would hide run files from the group
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    mode = os.stat(tmp).st_mode & 0o777
    try:
        write(tmp)
        os.chmod(tmp, mode)  # a writer that replaces the file itself (safetensors >= 0.8) leaves 0600
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
