"""Reconstruction speed of whichever sadag is importable: run it once per version, alternately, to compare versions.

    PYTHONPATH=OLD/src python benchmarks/recon_versions.py --label old --json out.jsonl
    PYTHONPATH=src     python benchmarks/recon_versions.py --label new --json out.jsonl

Times calibrate_unit_ at that version's defaults on every unit of ResNet-20 W4A4 (128 Gaussian images, minibatch
32): k2 - k1 iterations, after an untimed k1 run. Imports only what every version since the first has (no
benchmarks/_common.py), so an old checkout's src runs it unchanged. throughput.py compares engines within one
version; this script measures what both of its engines gained from shared code.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

import torch

import sadag
from sadag.config import CalibConfig
from sadag.quantization.prepare import float_copy
from sadag.reconstruction.cache import capture_unit_io
from sadag.reconstruction.reconstruct import calibrate_unit_

SHARED = Path(os.environ.get("SADAG_SHARED", Path(__file__).resolve().parents[2] / "shared"))


def unit_times(k1: int, k2: int) -> dict[str, float]:
    weights = SHARED / "weights/cifar10-resnet/resnet20-12fca82f.th"
    model, _ = sadag.load_model("resnet20_cifar10", weights=str(weights))
    calib = torch.randn(128, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    qmodel = sadag.quantize(model, sadag.QuantConfig(4, 4), calib[:1])
    fp, modules = float_copy(qmodel), dict(qmodel.named_modules())
    out = {}
    for unit in qmodel.sadag_plan.units:
        fp_in, fp_out = capture_unit_io(fp, unit, calib, 32)
        q_in, _ = capture_unit_io(qmodel, unit, calib, 32, want_output=False)

        def run(k: int, block: torch.nn.Module = modules[unit], data: tuple = (fp_in, q_in, fp_out)) -> float:
            start = time.perf_counter()
            calibrate_unit_(copy.deepcopy(block), *data, CalibConfig(iters=k, warmup=0.0), 0)
            return time.perf_counter() - start

        run(k1)
        out[unit] = (run(k2) - run(k1)) / (k2 - k1) * 1e3
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--label", required=True, help="the version's name in the output")
    p.add_argument("--k1", type=int, default=5)
    p.add_argument("--k2", type=int, default=45)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, help="append one JSON line {label, ms_all_units, units} to this file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    units = unit_times(args.k1, args.k2)
    total = sum(units.values())
    print(f"{args.label}: {total:.1f} ms per iteration of all units; "
          + " ".join(f"{u}={v:.1f}" for u, v in units.items()), flush=True)
    if args.json:
        with args.json.open("a") as f:
            f.write(json.dumps({"label": args.label, "ms_all_units": total, "units": units}) + "\n")


if __name__ == "__main__":
    main()
