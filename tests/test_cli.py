"""The `sadag` command end to end on real data, its errors, and resume after a kill."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import CIFAR_TEST, CIFAR_TRAIN, R20_WEIGHTS, TINY, needs_shared, tiny_bn_model

R20 = ["--model", "resnet20_cifar10", "--weights", str(R20_WEIGHTS)]
REPORT_KEYS = {"model", "method", "w_bits", "a_bits", "seed", "num_calib", "fp_top1", "quant_top1", "quant_top5",
               "fp_nonfinite_images", "quant_nonfinite_images", "seconds"}


@needs_shared
def test_evaluate_prints_fp_top1(cli) -> None:
    code, out, _ = cli(["evaluate", *R20, "--data", str(CIFAR_TEST), "--limit", "30"])
    assert code == 0 and "top-1" in out and "(300 images)" in out


@needs_shared
def test_run_real_smoke_writes_report(tmp_path: Path, cli) -> None:
    out_dir = tmp_path / "run"
    args = ["run", *R20, "--method", "real", "--calib-data", str(CIFAR_TRAIN), "--num-calib", "32", "--bits", "4/4",
            "--preset", "smoke", "--eval-data", str(CIFAR_TEST), "--eval-limit", "10", "--out", str(out_dir),
            "--seed", "0", "--calib-iters", "5"]
    code, out, err = cli(args)
    assert code == 0, err
    report = json.loads((out_dir / "report.json").read_text())
    assert REPORT_KEYS <= set(report)
    assert report["num_calib"] == 32 and report["method"] == "real" and report["eval_images"] == 100
    assert report["fp_top1"] > 50
    for name in ["config.yaml", "environment.json", "report.md", "calibration_grid.png", "metrics.jsonl",
                 "quantized.safetensors"]:
        assert (out_dir / name).is_file(), name
    # the exported model reloads with the same accuracy, and converts to ONNX that onnxruntime agrees with
    code, out, err = cli(["evaluate", "--quantized", str(out_dir / "quantized.safetensors"),
                              "--data", str(CIFAR_TEST), "--limit", "10"])
    assert code == 0 and f"top-1 {report['quant_top1']:.2f}%" in out, out + err
    code, out, err = cli(["export", "--run", str(out_dir), "--to", str(tmp_path / "m.onnx"),
                              "--verify-data", str(CIFAR_TEST), "--limit", "5"])
    assert code == 0 and "top-1 agreement" in out, err
    # an existing run directory is never overwritten silently
    code, _, err = cli(args)
    assert code == 2 and "--resume" in err and "--force" in err


def test_unknown_model_lists_names(tmp_path: Path, cli) -> None:
    code, _, err = cli(["run", "--model", "resnet21", "--method", "noise", "--out", str(tmp_path / "r")])
    assert code == 2 and "resnet21" in err and "resnet20_cifar10" in err


@pytest.mark.parametrize("bits", ["1/4", "4/9", "four"])
def test_bits_out_of_range(tmp_path: Path, cli, bits: str) -> None:
    code, _, err = cli(["run", "--model", "resnet20_cifar10", "--bits", bits, "--out", str(tmp_path)])
    assert code == 2 and "bits" in err


@needs_shared
def test_empty_data_folder(tmp_path: Path, cli) -> None:
    (tmp_path / "empty").mkdir()
    code, _, err = cli(["evaluate", "--model", "resnet20_cifar10", "--weights", str(R20_WEIGHTS),
                            "--data", str(tmp_path / "empty")])
    assert code == 2 and "no images" in err


def test_config_yaml_and_flags(tmp_path: Path) -> None:
    from sadag.cli import build_parser, config_from_args
    from sadag.config import apply_preset

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("model: resnet56_cifar10\nbits: 3/3\npreset: fast\ncalib:\n  iters: 77\ngen:\n  rho: 0.5\n")
    args = build_parser().parse_args(["run", "--config", str(cfg_file), "--bits", "2/4", "--out", "x",
                                      "--lr-z", "0.01"])
    assert (args.config, args.bits, args.out, vars(args)["gen.lr_z"]) == (str(cfg_file), "2/4", "x", 0.01)
    cfg = apply_preset(config_from_args(args))
    assert cfg.model == "resnet56_cifar10" and cfg.quant.w_bits == 2 and cfg.quant.a_bits == 4
    assert cfg.calib.iters == 77 and cfg.gen.rho == 0.5 and cfg.gen.num_images == 256  # preset + overrides
    assert cfg.gen.lr_z == 0.01
    assert apply_preset(cfg) == cfg


def _run_args(out: Path) -> list[str]:
    return [sys.executable, "-m", "sadag", "run", *R20, "--method", "genie", "--bits", "4/4", "--preset", "smoke",
            "--eval-data", str(CIFAR_TEST), "--eval-limit", "5", "--out", str(out), "--seed", "1", "--threads", "1",
            "--num-images", "32", "--gen-batch-size", "16", "--gen-iters", "40", "--calib-iters", "40",
            "--no-export"]


@needs_shared
@pytest.mark.slow
def test_kill_and_resume_matches_uninterrupted_run(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    ref = subprocess.run(_run_args(tmp_path / "ref"), env=env, capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr
    victim = tmp_path / "victim"
    proc = subprocess.Popen(_run_args(victim), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (victim / "state" / "calib.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (victim / "state" / "genie_batch_1.pt").exists()
    assert not (victim / "report.json").exists(), "the run finished before it could be killed"
    resumed = subprocess.run([*_run_args(victim), "--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    a = json.loads((tmp_path / "ref" / "report.json").read_text())
    b = json.loads((victim / "report.json").read_text())
    for key in ["fp_top1", "quant_top1", "quant_top5", "num_calib", "method"]:
        assert a[key] == b[key], key


def test_model_without_batchnorm_suggests_noise_or_real(tmp_path: Path, cli) -> None:
    code, _, err = cli(["run", "--model", "conftest:no_bn_model", "--method", "sadag", "--preset", "smoke",
                            "--out", str(tmp_path / "r")])
    assert code == 2 and "BatchNorm" in err and "noise" in err and "real" in err
    # the same model quantizes fine from noise
    code, _, err = cli(["run", "--model", "conftest:no_bn_model", "--method", "noise", "--preset", "smoke",
                            "--out", str(tmp_path / "n"), "--no-export"])
    assert code == 0, err


def test_generate_once_then_calibrate_from_the_saved_set(tmp_path: Path, cli) -> None:
    import torch

    from sadag.export import load_quantized
    from sadag.generation import near_duplicates

    tiny = TINY
    set_dir = tmp_path / "set"
    code, _, err = cli(["generate", *tiny, "--method", "genie", "--out", str(set_dir)])
    assert code == 0, err
    payload = torch.load(set_dir / "images.pt", weights_only=True)
    assert payload["images"].shape == (32, 3, 16, 16) and (set_dir / "grid.png").is_file()
    assert payload["meta"]["method"] == "genie"
    assert payload["meta"]["near_duplicates"] == near_duplicates(payload["images"])
    for bits in ("4/4", "2/4"):  # one set, several bit widths
        out = tmp_path / f"w{bits[0]}a{bits[2]}"
        code, _, err = cli(["run", *tiny, "--calib-data", str(set_dir), "--bits", bits, "--out", str(out),
                            "--allow-import"])
        assert code == 0, err
        report = json.loads((out / "report.json").read_text())
        assert report["method"] == "genie" and report["num_calib"] == 32 and report["w_bits"] == int(bits[0])
        assert "generate" not in report["seconds"] and "load_calib" in report["seconds"]
        # the export names the images' method too (the config's default method is sadag)
        _, meta = load_quantized(out / "quantized.safetensors", allow_import=True)
        assert meta["extra"]["method"] == "genie"


def test_unwritable_output_directory(tmp_path: Path, cli) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    code, _, err = cli(["run", "--model", "conftest:no_bn_model", "--method", "noise", "--preset", "smoke",
                            "--out", str(blocker / "run")])
    assert code == 2 and "cannot write" in err


def test_out_of_memory_keeps_checkpoint_and_says_how_to_resume(tmp_path: Path, cli, monkeypatch) -> None:
    import sadag.pipeline

    def boom(*_a, **_k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(sadag.pipeline, "reconstruct_", boom)
    out = tmp_path / "r"
    code, _, err = cli(["run", "--model", "conftest:no_bn_model", "--method", "noise", "--preset", "smoke",
                            "--out", str(out)])
    assert code == 3 and "--resume" in err and "--calib-batch-size" in err
    assert (out / "config.yaml").is_file()


def test_nan_calibration_images_are_refused(tmp_path: Path, cli) -> None:
    import torch

    bad = tmp_path / "bad.pt"
    images = torch.zeros(8, 3, 16, 16)
    images[0, 0, 0, 0] = float("nan")
    torch.save({"images": images, "meta": {"method": "noise"}}, bad)
    code, _, err = cli(["run", "--model", "conftest:no_bn_model", "--calib-data", str(bad), "--preset", "smoke",
                            "--out", str(tmp_path / "r")])
    assert code == 2 and "NaN" in err


def test_disk_full_keeps_checkpoints_and_says_how_to_resume(tmp_path: Path, cli, monkeypatch) -> None:
    import errno

    import sadag.rundir

    real_save = sadag.rundir.torch.save

    def save(obj, path, *a, **k):
        if "calib" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(sadag.rundir.torch, "save", save)
    out = tmp_path / "r"
    code, _, err = cli(["run", "--model", "conftest:no_bn_model", "--method", "noise", "--preset", "smoke",
                            "--out", str(out), "--no-export"])
    assert code == 2 and "out of disk space" in err and "--resume" in err
    assert (out / "state" / "seconds.pt").is_file() and not list((out / "state").glob(".*.tmp"))


def test_evaluate_passes_the_import_opt_in_and_checks_its_options(tmp_path: Path, cli, monkeypatch) -> None:
    import sadag.export

    seen: dict = {}

    def fake_load(path, model=None, *, allow_import=False):  # noqa: ANN001, ANN202
        seen.update(path=str(path), allow_import=allow_import)
        raise sadag.export.ExportFormatError("stop here")

    monkeypatch.setattr(sadag.export, "load_quantized", fake_load)
    for flags, allowed in (([], False), (["--allow-import"], True)):
        code, _, err = cli(["evaluate", "--quantized", tmp_path / "q.safetensors", "--data", tmp_path, *flags])
        assert code == 2 and "stop here" in err and seen["allow_import"] is allowed
    code, _, err = cli(["evaluate", "--quantized", tmp_path / "q.safetensors", "--data", tmp_path, "--device", "tpu"])
    assert code == 2 and "device (--device): got 'tpu'; allowed: auto, cpu, cuda, cuda:N" in err
    with pytest.raises(SystemExit):
        cli(["evaluate", "--model", "resnet20_cifar10", "--data", tmp_path, "--limit", "0"])


def test_flag_combinations_that_would_be_ignored_are_refused(tmp_path: Path, cli) -> None:
    q = tmp_path / "q.safetensors"  # never read: every refusal comes first
    refusals = [
        (["evaluate", "--quantized", q, "--model", "resnet56_cifar10", "--data", tmp_path], "--model: an exported"),
        (["evaluate", "--quantized", q, "--weights", "w.th", "--data", tmp_path], "--weights: an exported model"),
        (["export", "--quantized", q, "--to", tmp_path / "m.safetensors", "--verify-data", tmp_path],
         "--verify-data compares onnxruntime with PyTorch"),
        (["export", "--quantized", q, "--to", tmp_path / "m.onnx", "--limit", "3"], "--limit choose the images"),
        (["export", "--quantized", q, "--to", tmp_path / "m.onnx", "--verify-data", tmp_path / "absent"],
         "--verify-data folder .*absent does not exist"),
    ]
    for argv, message in refusals:
        code, _, err = cli(argv)
        assert code == 2 and re.search(message, err), (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written
    with pytest.raises(SystemExit):  # argparse: not allowed with argument --resume
        cli(["run", *TINY, "--out", tmp_path / "r", "--resume", "--force"])


@pytest.mark.parametrize(("flags", "message"), [
    (["--calib-data", "absent"], "calib_data (--calib-data) absent does not exist"),
    (["--eval-data", "c.yaml"], "eval_data (--eval-data) c.yaml is a file; it must be a folder"),
    (["--eval-data", ".", "--class-index", "."], "class_index (--class-index) . is a folder; it must be a file"),
    (["--class-index", "c.yaml"], "class_index (--class-index) c.yaml: it applies to the images of --eval-data"),
    (["--method", "sadag", "--warmup-model", "absent.safetensors"], "gen.warmup_model (--warmup-model) absent"),
])
def test_a_mistyped_input_path_leaves_no_run_directory(tmp_path: Path, cli, monkeypatch, flags, message) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text("{}\n")
    code, _, err = cli(["run", *TINY, "--out", "run", *flags])
    assert code == 2 and message in err, err
    assert not (tmp_path / "run").exists()  # the corrected command can use the same --out


def odd_size_model():  # noqa: ANN201
    """A factory for `--model test_cli:odd_size_model`: the tiny BN model at 30 x 30 (not a multiple of 4)."""
    from dataclasses import replace

    model, spec = tiny_bn_model()
    return model, replace(spec, input_size=30)


def float64_model():  # noqa: ANN201
    """A factory for `--model test_cli:float64_model`: the tiny BN model in float64."""
    model, spec = tiny_bn_model()
    return model.to(torch.float64), spec


@pytest.mark.parametrize(("model", "method", "message"), [
    ("odd_size_model", "genie", "this model's input size is 30: use --method zeroq or --method noise for it"),
    ("odd_size_model", "sadag", "this model's input size is 30: use --method zeroq or --method noise for it"),
    ("float64_model", "zeroq", "TinyNet has parameters in torch.float64 (stem.0.weight and 14 more): sadag "
                               "generates and calibrates in torch.float32"),
    ("float64_model", "noise", "convert it with model.float() (a module:factory model: return model.float())"),
])
@pytest.mark.parametrize("command", ["run", "generate"])
def test_a_model_the_method_cannot_use_is_refused_before_the_run_directory(tmp_path: Path, cli, command: str,
                                                                           model: str, method: str,
                                                                           message: str) -> None:
    out = tmp_path / "run"
    code, _, err = cli([command, "--model", f"test_cli:{model}", "--preset", "smoke", "--method", method,
                        "--out", out])
    assert code == 2 and message in err, err
    assert not out.exists()  # the corrected command can use the same --out
