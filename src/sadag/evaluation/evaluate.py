"""Top-1 / top-5 accuracy on real labelled images."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from ..distributed import SINGLE, Ranks, all_reduce_sum
from ..modes import eval_mode
from ..progress import Progress

log = logging.getLogger(__name__)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
    stage: str = "evaluate",
    total: int | None = None,
    ranks: Ranks = SINGLE,
) -> dict[str, float]:
    """Return {"top1", "top5", "num_images", "nonfinite_images"}; accuracies in percent. Counts stay on the
    device until the end. The model runs in eval mode; its own modes are restored after. An image whose logits
    hold NaN or infinity counts as a miss (topk would rank a NaN first) and is counted, with a warning.

    Under torchrun each rank passes its shard of the images; the counts are summed over the ranks.
    """
    with eval_mode(model):
        return _evaluate(model, batches, device, progress, stage, total, ranks)


def _evaluate(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], device: torch.device | str,
              progress: Progress | None, stage: str, total: int | None, ranks: Ranks) -> dict[str, float]:
    correct1 = torch.zeros((), dtype=torch.long, device=device)
    correct5 = torch.zeros((), dtype=torch.long, device=device)
    nonfinite = torch.zeros((), dtype=torch.long, device=device)
    seen = 0
    total = total if total is not None else len(batches) if hasattr(batches, "__len__") else 0
    for step, (images, labels) in enumerate(batches, 1):
        images, labels = images.to(device), labels.to(device)
        logits = model(images)
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        finite = logits.isfinite().all(dim=1)
        hits = (top5 == labels[:, None]) & finite[:, None]
        nonfinite += (~finite).sum()
        correct1 += hits[:, 0].sum()
        correct5 += hits.any(dim=1).sum()
        seen += labels.numel()
        if progress is not None:
            progress(stage, step, total, {})
    counts = torch.stack([correct1, correct5, nonfinite, torch.tensor(seen, device=device)])
    hits1, hits5, bad, seen = (int(c) for c in all_reduce_sum(counts, ranks))
    if seen == 0:
        raise ValueError("no images to evaluate")
    if bad:
        log.warning("%s: the model's outputs hold NaN or infinity for %d of %d images (counted as misses)", stage,
                    bad, seen)
    return {"top1": 100.0 * hits1 / seen, "top5": 100.0 * hits5 / seen, "num_images": seen, "nonfinite_images": bad}
