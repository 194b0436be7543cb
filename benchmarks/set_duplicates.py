"""How many images of a synthetic set have a near-copy in it (sadag.generation.near_duplicates).

Usage: python benchmarks/set_duplicates.py SET_DIR [SET_DIR ...] [--name NAME]
A SET_DIR holding images.pt is counted over all its images; one holding only grid.png (a set whose tensors
were not kept, e.g. one made on a leased GPU) over the grid's tiles (the first 64 images).
Prints a table and writes benchmarks/results/set_duplicates_<NAME>.json.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from _common import write_results
from sadag.generation import load_synthetic_set, near_duplicates
from sadag.generation.duplicates import NEAR_COPY_COSINE


def grid_tiles(path: Path, count: int = 64, pad: int = 2) -> torch.Tensor:
    """The tiles of a grid written by sadag.generation.io.image_grid (square, `pad` pixels apart)."""
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
    cols = math.ceil(math.sqrt(count))
    size, rest = divmod(pixels.shape[1] - pad, cols)
    if rest or size <= pad:
        raise SystemExit(f"{path} is not a {cols}-column grid of {count} tiles")
    size -= pad
    starts = [pad + k * (size + pad) for k in range(cols)]
    tiles = [pixels[top:top + size, left:left + size] for top in starts for left in starts]
    return torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2)


def count(set_dir: Path) -> dict:
    if (set_dir / "images.pt").is_file():
        images, _ = load_synthetic_set(set_dir)
        source = "images.pt"
    else:
        images, source = grid_tiles(set_dir / "grid.png"), "grid.png"
    n = int(images.shape[0])
    dup = near_duplicates(images)
    return {"set": set_dir.name, "source": source, "images": n, "near_duplicates": dup, "fraction": dup / n}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("sets", nargs="+", type=Path)
    p.add_argument("--name", default="sets")
    args = p.parse_args()
    rows = [count(s) for s in args.sets]
    print("| set | counted over | images with a near-copy |\n|---|---|---|")
    for r in rows:
        print(f"| {r['set']} | {r['images']} ({r['source']}) | {r['near_duplicates']} ({100 * r['fraction']:.0f}%) |")
    path = write_results(f"set_duplicates_{args.name}", rows, {"threshold": NEAR_COPY_COSINE, "pooled_to": 32})
    print(f"results in {path}")


if __name__ == "__main__":
    main()
