"""A run directory: resolved config, atomic checkpoints of finished work, metrics and reports."""

from __future__ import annotations

import errno
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from .errors import SadagError

STATE = "state"


def atomic_write(path: Path, write: Any) -> None:
    """Write through a temporary file in the same folder, then os.replace: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise SadagError(
                f"out of disk space while writing {path}; earlier checkpoints are intact: free space, then rerun "
                "the same command with --resume"
            ) from exc
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_save(obj: Any, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_write_text(path: Path, text: str) -> None:
    def write(tmp: str) -> None:
        Path(tmp).write_text(text)

    atomic_write(path, write)


class RunDir:
    """Paths and checkpoint files of one run. Nothing is overwritten without resume or force."""

    def __init__(self, root: str | os.PathLike, *, resume: bool = False, force: bool = False):
        self.root = Path(root)
        if self.root.exists() and any(self.root.iterdir()):
            if force:
                shutil.rmtree(self.root)
            elif not resume:
                raise SadagError(
                    f"run directory {self.root} already exists and is not empty; pass --resume to continue it "
                    "or --force to start over (its contents are deleted)"
                )
        try:
            (self.root / STATE).mkdir(parents=True, exist_ok=True)
            probe = self.root / ".write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as exc:
            raise SadagError(
                f"cannot write to the run directory {self.root}: {exc.strerror}; choose another --out"
            ) from exc
        self.metrics_file = self.root / "metrics.jsonl"

    def path(self, name: str) -> Path:
        return self.root / name

    def state_path(self, name: str) -> Path:
        return self.root / STATE / name

    def save_state(self, name: str, obj: Any) -> None:
        atomic_save(obj, self.state_path(name))

    def load_state(self, name: str) -> Any | None:
        path = self.state_path(name)
        return torch.load(path, map_location="cpu", weights_only=False) if path.exists() else None

    def write_json(self, name: str, data: Any) -> None:
        atomic_write_text(self.root / name, json.dumps(data, indent=2, default=str) + "\n")

    def log_metrics(self, record: dict[str, Any]) -> None:
        with self.metrics_file.open("a") as f:
            f.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")


def environment(device: torch.device) -> dict[str, Any]:
    from . import __version__

    env = {
        "sadag": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env
