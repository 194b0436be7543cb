"""Top-1 / top-5 accuracy on real labelled images."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from ..distributed import SINGLE, Ranks, all_reduce_sum
from ..errors import DataError, ModelError
from ..modes import eval_mode
from ..progress import Progress
from ..quantization.quantizers import check_act_quantizers_calibrated

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

    Each batch is (images, labels): the model must return (N, C) logits for N images, and the labels are the
    N class indices in [0, C), of shape (N,) or (N, 1); anything else is refused rather than scored.

    A quantized model whose activation quantizers were never calibrated is refused: they would pass their
    inputs through in full precision and the accuracy would be the weights-only one.

    Under torchrun each rank passes its shard of the images; the counts are summed over the ranks.
    """
    check_act_quantizers_calibrated(model, "the evaluation")
    with eval_mode(model):
        return _evaluate(model, batches, device, progress, stage, total, ranks)


def _evaluate(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], device: torch.device | str,
              progress: Progress | None, stage: str, total: int | None, ranks: Ranks) -> dict[str, float]:
    # top-1 hits, top-5 hits, non-finite rows, labels outside [0, C): on the device, a check per batch would sync
    correct1, correct5, nonfinite, outside = (torch.zeros((), dtype=torch.long, device=device) for _ in range(4))
    seen, classes = 0, 0
    total = total if total is not None else len(batches) if hasattr(batches, "__len__") else 0
    for step, (images, labels) in enumerate(batches, 1):
        images, labels = images.to(device), labels.to(device)
        logits = model(images)
        labels = _checked_labels(logits, labels, images.shape[0], step)
        classes = logits.shape[1]
        outside += ((labels < 0) | (labels >= classes)).sum()
        top5 = logits.topk(min(5, classes), dim=1).indices
        finite = logits.isfinite().all(dim=1)
        hits = (top5 == labels[:, None]) & finite[:, None]
        nonfinite += (~finite).sum()
        correct1 += hits[:, 0].sum()
        correct5 += hits.any(dim=1).sum()
        seen += labels.numel()
        if progress is not None:
            progress(stage, step, total, {})
    counts = torch.stack([correct1, correct5, nonfinite, outside, torch.tensor(seen, device=device)])
    hits1, hits5, bad, outside, seen = (int(c) for c in all_reduce_sum(counts, ranks))
    if seen == 0:
        raise ValueError("no images to evaluate")
    if outside:
        raise DataError(f"{stage}: {outside} of {seen} labels are not class indices of the model's output (0 to "
                        f"{classes - 1}); check that the dataset's classes are the model's, in its order")
    if bad:
        log.warning("%s: the model's outputs hold NaN or infinity for %d of %d images (counted as misses)", stage,
                    bad, seen)
    return {"top1": 100.0 * hits1 / seen, "top5": 100.0 * hits5 / seen, "num_images": seen, "nonfinite_images": bad}


def _checked_labels(logits: Tensor, labels: Tensor, n: int, step: int) -> Tensor:
    """The labels as (N,) class indices, after checking the shapes: a (N, C, 1, 1) output or (N, 1) labels
    broadcast silently in the comparison (a top-5 of 275%)."""
    if logits.dim() != 2 or logits.shape[0] != n:
        raise ModelError(f"batch {step}: the model returned outputs of shape {tuple(logits.shape)} for {n} images; "
                         f"evaluation needs logits of shape ({n}, classes): flatten or squeeze the model's output")
    if labels.dim() == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.dim() != 1 or labels.shape[0] != n:
        raise DataError(f"batch {step}: labels of shape {tuple(labels.shape)} for {n} images; give one class index "
                        f"per image, of shape ({n},) or ({n}, 1)")
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise DataError(f"batch {step}: labels of dtype {labels.dtype}; give integer class indices (e.g. "
                        "labels.long())")
    return labels
