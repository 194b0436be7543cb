"""The `sadag` command: argument parsing and printing only; the work is in sadag.pipeline and friends."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

from .config import METHODS, NEIGHBORS, PRESETS, RunConfig, run_config_from_dict
from .errors import ConfigError, SadagError
from .progress import ProgressPrinter

# flag -> (config section, field) for options that override the preset's budgets
_OVERRIDES: dict[str, tuple[str, str, type]] = {
    "calib_iters": ("calib", "iters", int),
    "calib_batch_size": ("calib", "batch_size", int),
    "num_images": ("gen", "num_images", int),
    "gen_batch_size": ("gen", "batch_size", int),
    "gen_iters": ("gen", "genie_iters", int),
    "lr_z": ("gen", "lr_z", float),  # 0.01 keeps Genie-D's latents off zero, where they collapse to one image
    "warmup_calib_iters": ("gen", "warmup_calib_iters", int),
    "refine_iters": ("gen", "refine_iters", int),
    "zeroq_iters": ("gen", "zeroq_iters", int),
    "neighbor": ("gen", "neighbor", str),
    "lambda_gm": ("gen", "lambda_gm", float),
    "lambda_div": ("gen", "lambda_div", float),
    "rho": ("gen", "rho", float),
    "units": ("quant", "units", str),
}
_TOP_LEVEL = ("model", "weights", "method", "bits", "preset", "calib_data", "num_calib", "eval_data", "class_index",
              "eval_batch_size", "eval_limit", "out", "seed", "device")


def _add_run_args(p: argparse.ArgumentParser, need_out: bool = True) -> None:
    p.add_argument("--config", help="YAML file filling the run config; flags given here override it")
    p.add_argument("--model", help="zoo name (see `sadag models`) or module.path:factory")
    p.add_argument("--weights", help="checkpoint file (default: the model's download location)")
    p.add_argument("--method", choices=METHODS, help="calibration data: sadag (default), genie, zeroq, noise, real")
    p.add_argument("--bits", help="W/A, e.g. 4/4, 3/3, 2/4, 4/fp (default 4/4)")
    p.add_argument("--preset", choices=list(PRESETS), help="iteration budget: paper (default), fast, smoke")
    p.add_argument("--calib-data", help="real image folder (method real) or a set saved by `sadag generate`")
    p.add_argument("--num-calib", type=int, help="calibration images to sample from a real folder (default 1024)")
    p.add_argument("--eval-data", help="labelled image folder to measure top-1/top-5 on")
    p.add_argument("--class-index", help="file of class folder names, one per line, in label order")
    p.add_argument("--eval-batch-size", type=int)
    p.add_argument("--eval-limit", type=int, help="evaluate on at most this many images per class")
    p.add_argument("--out", required=need_out, help="run directory (never overwritten without --resume/--force)")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:1 ...")
    p.add_argument("--threads", type=int, help="CPU threads for torch")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--force", action="store_true", help="delete --out and start over")
    p.add_argument("--fold-bn", action="store_true", default=None, help="fold BatchNorm into convs before quantizing")
    p.add_argument("--no-8bit-ends", action="store_true", default=None,
                   help="quantize the first and last layers at the target bits too")
    g = p.add_argument_group("budget overrides (win over the preset)")
    for flag, (_section, _field, kind) in _OVERRIDES.items():
        kwargs: dict[str, Any] = {"type": kind}
        if flag == "neighbor":
            kwargs["choices"] = NEIGHBORS
        if flag == "units":
            kwargs["help"] = "comma-separated module names of the reconstruction units"
        g.add_argument("--" + flag.replace("_", "-"), **kwargs)


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """Defaults < YAML file < flags."""
    data: dict[str, Any] = {}
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a mapping of config keys")
    for key in _TOP_LEVEL:
        value = getattr(args, key, None)
        if value is not None:
            data[key] = value
    for flag, (section, field, _kind) in _OVERRIDES.items():
        value = getattr(args, flag, None)
        if value is not None:
            data.setdefault(section, {})[field] = value.split(",") if field == "units" else value
    if getattr(args, "fold_bn", None):
        data.setdefault("quant", {})["fold_bn"] = True
    if getattr(args, "no_8bit_ends", None):
        data.setdefault("quant", {})["first_last_8bit"] = False
    return run_config_from_dict(data)


def _cmd_run(args: argparse.Namespace) -> int:
    from .pipeline import run

    cfg = config_from_args(args)
    report = run(cfg, resume=args.resume, force=args.force, progress=ProgressPrinter(), export=not args.no_export)
    print(json.dumps(report, indent=2))
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    if not args.calib_data and not args.config:
        raise ConfigError("calibrate needs --calib-data (a real image folder or a set saved by `sadag generate`)")
    return _cmd_run(args)


def _cmd_generate(args: argparse.Namespace) -> int:
    from .pipeline import generate_set

    out = generate_set(config_from_args(args), resume=args.resume, force=args.force, progress=ProgressPrinter())
    print(f"saved the synthetic calibration set to {out}/images.pt (preview: {out}/grid.png)")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .data import ImageFolderDataset, make_loader
    from .evaluation import evaluate
    from .models import load_model
    from .pipeline import resolve_device

    device = resolve_device(args.device)
    if args.quantized:
        from .export import load_quantized
        from .models import DataSpec

        model, meta = load_quantized(args.quantized)
        spec, name = DataSpec.from_dict(meta["spec"]), f"{meta['model_name']} (quantized {args.quantized})"
    else:
        if not args.model:
            raise ConfigError("evaluate needs --model NAME (or --quantized FILE.safetensors)")
        model, spec = load_model(args.model, weights=args.weights)
        name = args.model
    dataset = ImageFolderDataset(args.data, spec, class_index=args.class_index, limit=args.limit)
    loader = make_loader(dataset, args.batch_size)
    metrics = evaluate(model.to(device), loader, device, progress=ProgressPrinter(), total=len(loader))
    print(f"{name}: top-1 {metrics['top1']:.2f}%  top-5 {metrics['top5']:.2f}%  ({metrics['num_images']} images)")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .export import export_onnx, load_quantized
    from .models import DataSpec

    source = Path(args.run) / "quantized.safetensors" if args.run else Path(args.quantized)
    model, meta = load_quantized(source)
    spec = DataSpec.from_dict(meta["spec"])
    export_onnx(model, args.onnx, spec, opset=args.opset)
    print(f"wrote {args.onnx} (QDQ ONNX, opset {args.opset}) from {source}")
    if args.verify_data:
        import torch

        from .data import ImageFolderDataset
        from .export import verify_onnx

        data = ImageFolderDataset(args.verify_data, spec, class_index=args.class_index, limit=args.limit)
        images, labels = zip(*(data[i] for i in range(len(data))), strict=True)
        r = verify_onnx(args.onnx, model, torch.stack(images), torch.tensor(labels))
        print(f"onnxruntime vs PyTorch on {r['num_images']} images: max |logit diff| {r['max_abs_diff']:.3g}, "
              f"top-1 agreement {100 * r['top1_agreement']:.2f}%, top-1 PyTorch {100 * r['top1_torch']:.2f}% "
              f"/ ONNX {100 * r['top1_onnx']:.2f}%")
    return 0


def _cmd_models(_args: argparse.Namespace) -> int:
    from .models import list_models

    print(f"{'name':24} {'input':>6} {'classes':>8}  weights")
    for info in list_models():
        print(f"{info.name:24} {info.input_size:>6} {info.num_classes:>8}  {info.weights}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sadag", description="Data-free low-bit quantization (Genie, SADAG).")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="generate or load calibration data, calibrate, evaluate, export")
    _add_run_args(p)
    p.add_argument("--no-export", action="store_true", help="do not write quantized.safetensors")
    p.set_defaults(func=_cmd_run)
    p = sub.add_parser("calibrate", help="calibrate on a saved synthetic set or a real folder (--calib-data)")
    _add_run_args(p)
    p.add_argument("--no-export", action="store_true")
    p.set_defaults(func=_cmd_calibrate)
    p = sub.add_parser("generate", help="synthesize a calibration set once, to reuse at several bit widths")
    _add_run_args(p)
    p.set_defaults(func=_cmd_generate)
    p = sub.add_parser("evaluate", help="top-1/top-5 of an FP model or an exported quantized model")
    p.add_argument("--model")
    p.add_argument("--weights")
    p.add_argument("--quantized", help="a quantized.safetensors written by `sadag run`")
    p.add_argument("--data", required=True, help="labelled image folder ROOT/<class>/<image>")
    p.add_argument("--class-index")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--limit", type=int, help="at most this many images per class")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int)
    p.set_defaults(func=_cmd_evaluate)
    p = sub.add_parser("export", help="export a calibrated model to ONNX (QDQ)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="a run directory holding quantized.safetensors")
    src.add_argument("--quantized", help="a quantized.safetensors file")
    p.add_argument("--onnx", required=True, help="output .onnx path")
    p.add_argument("--opset", type=int, default=21)
    p.add_argument("--verify-data", help="labelled image folder: compare onnxruntime with PyTorch on it")
    p.add_argument("--class-index")
    p.add_argument("--limit", type=int, default=20, help="images per class for --verify-data (default 20)")
    p.add_argument("--threads", type=int)
    p.set_defaults(func=_cmd_export)
    p = sub.add_parser("models", help="list the model zoo")
    p.set_defaults(func=_cmd_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    try:
        return args.func(args)
    except SadagError as exc:
        print(f"sadag: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sadag: interrupted; finished work is checkpointed: rerun with --resume to continue", file=sys.stderr)
        return 130
    except (torch.OutOfMemoryError, MemoryError) as exc:
        return _out_of_memory(exc)
    except RuntimeError as exc:
        if "can't allocate memory" in str(exc) or "out of memory" in str(exc):
            return _out_of_memory(exc)
        raise


def _out_of_memory(exc: BaseException) -> int:
    first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    print(f"sadag: error: out of memory ({first_line}); finished work is checkpointed in the run directory: rerun "
          "the same command with --resume and a smaller --calib-batch-size, --gen-batch-size or --eval-batch-size",
          file=sys.stderr)
    return 3


if __name__ == "__main__":
    sys.exit(main())
