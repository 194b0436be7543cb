"""Progress lines with ETA for the CLI; the library itself only calls a callback."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping
from typing import TextIO

import torch
from torch import Tensor

# progress(stage, step, total, metrics): the one callback type of the library
Progress = Callable[[str, int, int, dict[str, float]], None]
LOG_EVERY = 50  # iterations between progress reports / metrics.jsonl records of the iterative stages


def widest_float(device: torch.device) -> torch.dtype:
    """float64, except on Apple's MPS, which has none."""
    return torch.float32 if device.type == "mps" else torch.float64


def host_floats(values: Mapping[str, Tensor | float]) -> dict[str, float]:
    """Scalar metrics (device tensors or numbers) as Python floats, through one host sync."""
    device = next((v.device for v in values.values() if isinstance(v, Tensor)), torch.device("cpu"))
    dtype = widest_float(device)
    stacked = torch.stack([v.detach().to(dtype).reshape(()) if isinstance(v, Tensor)
                           else torch.tensor(float(v), dtype=dtype, device=device) for v in values.values()])
    return dict(zip(values, stacked.tolist(), strict=True))


class ProgressPrinter:
    """A progress(stage, step, total, metrics) callback that redraws one line per stage on stderr."""

    def __init__(self, stream: TextIO = sys.stderr, min_interval: float = 0.5) -> None:
        self.stream = stream
        self.min_interval = min_interval
        self.stage: str | None = None
        self.start = 0.0
        self.first_step = 0  # the step this process first saw: a resumed stage starts past 0
        self.last = 0.0
        self.tty = hasattr(stream, "isatty") and stream.isatty()

    def __call__(self, stage: str, step: int, total: int, metrics: dict[str, float]) -> None:
        now = time.monotonic()
        if stage != self.stage:
            if self.stage is not None and self.tty:
                self.stream.write("\n")
            self.stage, self.start, self.first_step, self.last = stage, now, step, 0.0
        done = total and step >= total
        if not done and now - self.last < self.min_interval:
            return
        self.last = now
        line = self._line(stage, step, total, metrics, now)
        self.stream.write(f"\r{line}" if self.tty else f"{line}\n")
        if done and self.tty:
            self.stream.write("\n")
        self.stream.flush()

    def _line(self, stage: str, step: int, total: int, metrics: dict[str, float], now: float) -> str:
        elapsed = now - self.start
        if total:
            frac = min(step / total, 1.0)
            bar = "#" * int(20 * frac) + "-" * (20 - int(20 * frac))
            done_here = step - self.first_step  # the rate of this process's own steps
            eta = elapsed * (total - step) / done_here if done_here > 0 else 0.0
            head = f"{stage} [{bar}] {step}/{total} {elapsed:.0f}s<{eta:.0f}s"
        else:
            head = f"{stage} {step} {elapsed:.0f}s"
        tail = " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
        return f"{head} {tail}".rstrip()
