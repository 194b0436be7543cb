"""Reconstruction loss and AdaRound's regulariser schedule."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


def reconstruction_loss(out: Tensor, target: Tensor) -> Tensor:
    """Squared error summed over channels (dim 1), averaged over batch and positions."""
    return (out - target).pow(2).sum(1).mean()


@dataclass(frozen=True)
class BetaSchedule:
    """AdaRound's beta: constant during warm-up (regulariser off), then linear from start to end."""

    iters: int
    warmup: float = 0.2
    start: float = 20.0
    end: float = 2.0

    def regularizer_on(self, t: int) -> bool:
        return t >= self.warmup * self.iters

    def __call__(self, t: int) -> float:
        begin = self.warmup * self.iters
        if t < begin:
            return self.start
        rel = (t - begin) / max(self.iters - begin, 1)
        return self.end + (self.start - self.end) * max(0.0, 1.0 - rel)
