"""A check of a synthetic set's diversity: how many images have a near-copy in the set.

BatchNorm-statistics matching is a batch-level loss, so a generator can satisfy it with a few images
repeated many times. Seen with Genie-D on EfficientNet-Lite0 at 224x224: with z's lr at 0.1 some latents
shrink toward 0 and all map to the same image (benchmarks/genie_collapse.py). This count makes the
collapse visible without looking at the grid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

NEAR_COPY_COSINE = 0.95  # above this pixel cosine two images count as copies


def near_copy_mask(images: Tensor, threshold: float = NEAR_COPY_COSINE, size: int = 32, chunk: int = 1024) -> Tensor:
    """For each image, whether its most similar other image has a pixel cosine above `threshold`.

    Images are average-pooled to `size` x `size` (a copy stays a copy; the check stays cheap at 224x224)
    and centred per image, so the cosine compares patterns, not brightness.
    """
    if images.ndim != 4:
        raise ValueError(f"expected images of shape (N, C, H, W), got {tuple(images.shape)}")
    n = images.shape[0]
    if n < 2:
        return torch.zeros(n, dtype=torch.bool, device=images.device)
    x = images.detach().float()
    if x.shape[-1] > size or x.shape[-2] > size:
        x = F.adaptive_avg_pool2d(x, size)
    x = x.flatten(1)
    x = F.normalize(x - x.mean(1, keepdim=True), dim=1)
    masks = []
    for start in range(0, n, chunk):
        sim = x[start:start + chunk] @ x.T
        rows = torch.arange(sim.shape[0], device=sim.device)
        sim[rows, rows + start] = -1.0  # an image is not its own copy
        masks.append(sim.max(1).values > threshold)
    return torch.cat(masks)


def near_duplicates(images: Tensor, threshold: float = NEAR_COPY_COSINE, size: int = 32, chunk: int = 1024) -> int:
    """Number of images with a near-copy in the set (see near_copy_mask)."""
    return int(near_copy_mask(images, threshold, size, chunk).sum())
