"""A run directory: resolved config, atomic checkpoints of finished work, metrics and reports.

Guarantees (docs/guarantees.md): a directory is a sadag run only if it carries :data:`MARKER`, which records
the fingerprint of the settings that can change the result; ``resume`` continues only a run with the same
fingerprint, ``force`` replaces only a run; one process at a time (an advisory ``fcntl.flock`` on
:data:`LOCK`); checkpoints hold tensors and plain containers only and are read with ``weights_only=True``.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import platform
import secrets
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from .errors import SadagError
from .files import write_atomically

STATE = "state"
MARKER = "sadag-run.json"
LOCK = ".sadag.lock"
_PLAIN = (str, int, float, bool, type(None))


INPUTS = "inputs.pt"  # digests of the files a run reads again when it resumes


class StateStore(Protocol):
    """Where a run checkpoints finished work (a run directory's ``state/``); plain data only."""

    def load_state(self, name: str) -> Any | None: ...

    def save_state(self, name: str, obj: Any) -> None: ...

    def drop_state(self, name: str) -> None: ...


class RunDirError(SadagError):
    """A run directory that cannot be used as asked (not a run, another run's settings, in use, unreadable)."""


def check_plain(obj: Any, what: str) -> None:
    """Refuse anything but tensors and dict/list/tuple/str/int/float/bool/None: what sadag writes must load with
    ``torch.load(weights_only=True)`` and never needs a class to be imported."""
    if isinstance(obj, Tensor) or type(obj) in _PLAIN:
        return
    if type(obj) is dict:
        for key, value in obj.items():
            if type(key) not in _PLAIN:
                raise TypeError(f"{what}: key {key!r} is a {type(key).__name__}, not a plain value")
            check_plain(value, f"{what}[{key!r}]")
        return
    if type(obj) in (list, tuple):
        for i, value in enumerate(obj):
            check_plain(value, f"{what}[{i}]")
        return
    raise TypeError(f"{what} is a {type(obj).__name__}: store tensors and plain containers only")


def atomic_write(path: Path, write: Any) -> None:
    """A run file written atomically (:func:`sadag.files.write_atomically`); a full disk says how to resume."""
    try:
        write_atomically(path, write)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise SadagError(
                f"out of disk space while writing {path}; earlier checkpoints are intact: free space, then rerun "
                "the same command with --resume"
            ) from exc
        raise


def atomic_save(obj: Any, path: Path) -> None:
    check_plain(obj, str(path))
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_write_text(path: Path, text: str) -> None:
    def write(tmp: str) -> None:
        Path(tmp).write_text(text)

    atomic_write(path, write)


def _differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """The settings that differ; one the run never recorded (made before it existed) counts as its default."""
    from .config import result_defaults

    defaults = result_defaults()
    old = {**{k: v for k, v in defaults.items() if k in new}, **old}
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k, '(unset)')!r} in the run, {new.get(k, '(unset)')!r} now" for k in keys
            if old.get(k, "(unset)") != new.get(k, "(unset)")]


class RunDir:
    """Paths and checkpoint files of one run, held under an exclusive lock until :meth:`close`.

    ``settings``: the flat settings that can change the result (config.result_settings); they are written to
    the marker of a new run and compared with it on ``resume``. ``read_only``: the view of ranks > 0 under
    torchrun, opened after rank 0 opened (and checked) the run: checkpoints load, every write is skipped.
    """

    def __init__(self, root: str | os.PathLike, settings: Mapping[str, Any], *, resume: bool = False,
                 force: bool = False, read_only: bool = False) -> None:
        self.root = Path(root)
        self.settings = dict(settings)
        self._lock_file: Any = None
        self.read_only = read_only
        self.metrics_file = self.root / "metrics.jsonl"
        if read_only:
            if not (self.root / MARKER).is_file():
                raise RunDirError(f"{self.root} is not a sadag run directory (no {MARKER}); rank 0 should have made it")
            return
        is_run = self._check_existing(resume, force)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self._lock()
            if is_run and resume:
                self._check_settings()
                self._remove_orphans()
            elif is_run and force:
                self._clear()
            if not (is_run and resume):
                atomic_write_text(self.root / MARKER, json.dumps(self._marker(), indent=2) + "\n")
            (self.root / STATE).mkdir(exist_ok=True)
        except OSError as exc:
            self.close()
            raise RunDirError(f"cannot write to the run directory {self.root}: {exc.strerror}; choose another "
                              "--out") from exc
        except BaseException:
            self.close()
            raise

    def _check_existing(self, resume: bool, force: bool) -> bool:
        """Whether root is an existing sadag run; refuses what may not be touched."""
        if self.root.exists() and not self.root.is_dir():
            raise RunDirError(f"{self.root} exists and is not a directory; choose another --out")
        entries = [p for p in self.root.iterdir() if p.name != LOCK] if self.root.is_dir() else []
        if not entries:
            return False
        if not (self.root / MARKER).is_file():
            what = "resume it" if resume else "replace it" if force else "use it"
            raise RunDirError(f"{self.root} is not empty and is not a sadag run directory (no {MARKER}): sadag will "
                              f"not {what}; choose another --out")
        if not resume and not force:
            raise RunDirError(f"run directory {self.root} already exists; pass --resume to continue it or --force to "
                              "start over (its contents are deleted)")
        return True

    def _lock(self) -> None:
        self._lock_file = (self.root / LOCK).open("a")
        try:
            fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            self.close()
            raise RunDirError(f"run directory {self.root} is in use by another sadag process; wait for it to "
                              "finish (or stop it), or choose another --out") from exc

    def close(self) -> None:
        """Release the lock (also released when the process ends)."""
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _marker(self) -> dict[str, Any]:
        from . import __version__
        from .config import fingerprint

        # run_id: two runs of the same settings have different markers (ranks check they read the same run)
        return {"sadag_run": 1, "sadag": __version__, "run_id": secrets.token_hex(8),
                "fingerprint": fingerprint(self.settings), "settings": self.settings}

    def identity(self) -> str:
        """The digest of the run's marker: equal for two views of one run directory, different for two runs."""
        path = self.root / MARKER
        try:
            return hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError as exc:
            raise RunDirError(f"cannot read {path}: {exc.strerror}") from exc

    def _check_settings(self) -> None:
        path = self.root / MARKER
        try:
            marker = json.loads(path.read_text())
            old = marker["settings"]
        except (ValueError, KeyError, TypeError) as exc:
            raise RunDirError(f"{path} is unreadable ({exc}); this run cannot be resumed safely: start a new --out "
                              "or replace it with --force") from exc
        if "device" in old:
            old = {**old, "device": self._recorded_device_kind(old["device"])}
        if old.get("calib.engine") == "auto":  # made before engines were recorded resolved: which is unknown
            old = {**old, "calib.engine": self.settings.get("calib.engine")}
        diff = _differences(old, self.settings)
        if diff:
            raise RunDirError(f"cannot resume {self.root}: it was made with other settings ({'; '.join(diff)}). "
                              "Resume with the run's settings (its config.yaml: --config), or start a new --out, "
                              "or replace it with --force")

    def _recorded_device_kind(self, value: Any) -> Any:
        """The device type a run used. Runs made before the marker recorded it hold what was typed ("auto",
        "cuda:1"); for "auto", the device that environment.json says the run resolved it to."""
        if value == "auto":
            try:
                value = json.loads((self.root / "environment.json").read_text())["device"]
            except (OSError, ValueError, KeyError, TypeError):
                return value  # unknown: differs from every resolved device, so the resume is refused
        return value.split(":")[0] if isinstance(value, str) else value

    def _remove_orphans(self) -> None:
        """Temporary files of writes that an interrupted process never finished."""
        for folder in (self.root, self.root / STATE):
            for tmp in folder.glob(".*.tmp"):
                tmp.unlink()

    def _clear(self) -> None:
        for entry in self.root.iterdir():
            if entry.name == LOCK:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()

    def path(self, name: str) -> Path:
        return self.root / name

    def state_path(self, name: str) -> Path:
        return self.root / STATE / name

    @property
    def writable(self) -> bool:
        return not self.read_only

    def save_state(self, name: str, obj: Any) -> None:
        if self.read_only:
            return
        atomic_save(obj, self.state_path(name))

    def drop_state(self, name: str) -> None:
        if not self.read_only:
            self.state_path(name).unlink(missing_ok=True)

    def load_state(self, name: str) -> Any | None:
        path = self.state_path(name)
        if not path.exists():
            return None
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # truncated, garbage or holding pickled objects: all mean "redo this step"
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise RunDirError(f"the checkpoint {path} cannot be read ({reason[:200]}); delete it and rerun the same "
                              "command with --resume (only that step is redone)") from exc

    def write_json(self, name: str, data: Any) -> None:
        if self.read_only:
            return
        atomic_write_text(self.root / name, json.dumps(data, indent=2, default=str) + "\n")

    def log_metrics(self, record: dict[str, Any]) -> None:
        if self.read_only:
            return
        with self.metrics_file.open("a") as f:
            f.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")


def pin_input(store: StateStore, key: str, digest: str, label: str) -> None:
    """Record the digest of an input file that a run reads again when it resumes (a saved set, a warm-up model),
    and refuse a resume that finds another file there: the two would be mixed in one run."""
    pinned = store.load_state(INPUTS) or {}
    if key in pinned and pinned[key] != digest:
        raise RunDirError(f"{label} is not the one this run started from (digest {pinned[key]} then, {digest} now): "
                          "restore it, or start the run again with --force")
    if key not in pinned:
        store.save_state(INPUTS, {**pinned, key: digest})


def module_digest(module: torch.nn.Module) -> str:
    """The first 16 hex digits of the sha-256 of a module's state (names, shapes, dtypes, values)."""
    digest = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        if not isinstance(value, Tensor):  # a module's _extra_state may be any object: not part of the weights
            continue
        digest.update(f"{name}{tuple(value.shape)}{value.dtype}".encode())
        digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:16]


def environment(device: torch.device) -> dict[str, Any]:
    from . import __version__

    def cpu_model() -> str | None:
        # the CPU names the machine's float rounding better than the platform string; on Linux the kernel's
        # name for it, elsewhere what platform knows; never a reason for a run to fail
        if platform.system() == "Linux":
            try:
                with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
                    for line in info:  # the first processor's line: the rest repeat it
                        if line.startswith("model name"):
                            return line.partition(":")[2].strip() or None
            except OSError:
                pass
        return platform.processor() or None

    env = {
        "sadag": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "host": platform.node() or None,  # two sessions of one run on two machines round floats differently
        "cpu_model": cpu_model(),
        # CPU kernels repeat bit for bit at a fixed thread count; CUDA ones only with this on
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env
