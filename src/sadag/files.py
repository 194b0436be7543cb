"""Files from outside: their digests, and downloads that never leave a half-written file."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import urllib.request
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


def fetch(url: str, dest: Path, error: type[SadagError], hint: str) -> None:
    """Download ``url`` to ``dest`` through ``dest.part``; an unreachable URL raises ``error`` ending in ``hint``."""
    tmp = dest.with_name(dest.name + ".part")  # never a half-written file under the final name
    log.info("downloading %s to %s", url, dest)
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
            shutil.copyfileobj(r, f)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise error(f"could not download {url}: {e}; {hint}") from e
    tmp.replace(dest)
