"""`torchrun -m sadag` on 2 CPU ranks (gloo): the same set, the same calibration and accuracy as one process,
the run directory written once by rank 0, a failed rank named and its run resumable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from conftest import CIFAR_TEST, TINY, needs_shared
from sadag.generation.io import load_synthetic_set

TESTS = Path(__file__).parent
SRC = TESTS.parent / "src"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    path = os.pathsep.join([str(SRC), str(TESTS), env.get("PYTHONPATH", "")])
    return {**env, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def _sadag(args: list[str], ranks: int, **env: str) -> subprocess.CompletedProcess:
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)] if ranks > 1 else []
    cmd = [sys.executable, *launch, "-m", "sadag", *args, "--threads", "1"]
    return subprocess.run(cmd, env=_env(**env), capture_output=True, text=True, timeout=300)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_ranks_generate_the_one_process_set(tmp_path: Path) -> None:
    # 3 Genie-D batches: rank 0 makes 0 and 2, rank 1 makes 1; the set must not depend on the split
    args = ["generate", *TINY, "--method", "genie", "--num-images", "48", "--seed", "3"]
    one = _sadag([*args, "--out", str(tmp_path / "one")], 1)
    two = _sadag([*args, "--out", str(tmp_path / "two")], 2)
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("saved the synthetic calibration set") == 1  # rank 0 speaks for all
    (a, info_a), (b, info_b) = load_synthetic_set(tmp_path / "one"), load_synthetic_set(tmp_path / "two")
    assert torch.equal(a, b)
    for sa, sb in zip(info_a["artifacts"]["genie_batches"], info_b["artifacts"]["genie_batches"], strict=True):
        assert torch.equal(sa["z"], sb["z"])
        assert all(torch.equal(sa["generator_state"][k], sb["generator_state"][k]) for k in sa["generator_state"])
    # written once, by rank 0: no metric record twice (rank 0 logs its own batches' progress), a checkpoint per batch
    steps = [(r["stage"], r["step"]) for r in _metrics(tmp_path / "two")]
    assert steps and len(set(steps)) == len(steps)
    assert set(steps) <= {(r["stage"], r["step"]) for r in _metrics(tmp_path / "one")}
    assert sorted(p.name for p in (tmp_path / "two" / "state").glob("genie_batch_*")) == [
        f"genie_batch_{b}.pt" for b in range(3)]
    assert json.loads((tmp_path / "two" / "environment.json").read_text())["world_size"] == 2


def per_rank_model():  # noqa: ANN201
    """A factory for `--model test_torchrun:per_rank_model` that builds other weights in each process."""
    from conftest import TinyNet, randomize_bn_
    from sadag.models import DataSpec

    torch.manual_seed(int(os.environ.get("RANK", "0")))
    return randomize_bn_(TinyNet()), DataSpec(mean=(0.5,) * 3, std=(0.25,) * 3, input_size=16, num_classes=10)


def test_ranks_that_load_different_weights_stop_before_any_work(tmp_path: Path) -> None:
    out = tmp_path / "run"
    failed = _sadag(["run", "--model", "test_torchrun:per_rank_model", "--preset", "smoke", "--method", "noise",
                     "--out", str(out)], 2)
    assert failed.returncode != 0
    for rank in (0, 1):  # every rank stops, naming the mismatch and what to do
        assert f"sadag: error (rank {rank} of 2, stage setup): the ranks see different weights of the model " \
               "'test_torchrun:per_rank_model' (digest of their values) (rank 0 sees '" in failed.stderr, failed.stderr
    assert "rank 1 sees '" in failed.stderr and "seed its init" in failed.stderr
    assert not out.exists()  # nothing written


@needs_shared
def test_two_ranks_run_fail_resume_and_match_one_process(tmp_path: Path) -> None:
    """ZeroQ sharded, QDrop reconstruction data-parallel, evaluation sharded; rank 1 fails entering calibration,
    the job stops naming it, and --resume finishes the run with one process's results."""
    args = ["run", *TINY, "--method", "zeroq", "--num-images", "48", "--seed", "2", "--calib-iters", "30",
            "--eval-data", str(CIFAR_TEST), "--eval-limit", "41", "--eval-batch-size", "16"]
    one = _sadag([*args, "--out", str(tmp_path / "one")], 1)
    assert one.returncode == 0, one.stderr
    two = tmp_path / "two"
    failed = _sadag([*args, "--out", str(two)], 2, SADAG_TEST_FAIL_AT="1:calibrate")
    assert failed.returncode != 0
    assert "sadag: error (rank 1 of 2, stage calibrate): SADAG_TEST_FAIL_AT" in failed.stderr, failed.stderr
    assert not (two / "report.json").exists() and (two / "synthetic" / "images.pt").exists()
    resumed = _sadag([*args, "--out", str(two), "--resume"], 2)
    assert resumed.returncode == 0, resumed.stderr
    # rank 0 finished its report: no rank left the job early with its process group open
    assert (two / "report.md").is_file() and (two / "quantized.safetensors").is_file()
    # the same synthetic set, bit for bit (made before the failure, by 2 ranks)
    assert torch.equal(load_synthetic_set(tmp_path / "one" / "synthetic")[0], load_synthetic_set(two / "synthetic")[0])
    # data-parallel reconstruction: the same updates within float tolerance
    want = torch.load(tmp_path / "one" / "state" / "calib.pt", weights_only=True)["state_dict"]
    got = torch.load(two / "state" / "calib.pt", weights_only=True)["state_dict"]
    assert want.keys() == got.keys()
    for key, value in want.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-5, msg=key)
        else:
            assert got[key] == value if not isinstance(value, torch.Tensor) else torch.equal(got[key], value), key
    a, b = (json.loads((r / "report.json").read_text()) for r in (tmp_path / "one", two))
    for key in ["fp_top1", "fp_top5", "eval_images", "quant_top1", "quant_top5", "num_calib"]:
        assert a[key] == b[key], key
    assert b["world_size"] == 2 and (two / "quantized.safetensors").exists()
