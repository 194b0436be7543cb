"""The `sadag` command: argument parsing and printing only; the work is in sadag.pipeline and friends."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import torch

from . import distributed
from .config import (
    CalibConfig,
    GenConfig,
    QuantConfig,
    RunConfig,
    check_file_layer,
    merge_layers,
    read_yaml,
    run_config_from_dict,
    schema_fields,
)
from .errors import ConfigError, SadagError
from .progress import ProgressPrinter
from .rundir import LOCK

# (section, dataclass, group title): the flags of run/generate/calibrate are generated from these fields' metadata
_SCHEMA: list[tuple[str | None, type, str]] = [
    (None, RunConfig, "run"),
    ("quant", QuantConfig, "quantization (quant.*)"),
    ("calib", CalibConfig, "calibration (calib.*)"),
    ("gen", GenConfig, "calibration data generation (gen.*)"),
]


def _csv(text: str) -> list[str]:
    return [part for part in text.split(",") if part]


def _flag_type(hint: Any) -> Any:
    """The argparse type of a field's hint: the non-None member of an Optional, the element type of a list."""
    if get_origin(hint) is Literal:
        return str
    args = [a for a in get_args(hint) if a is not type(None)]
    base = args[0] if args and get_origin(hint) is not None else hint
    return str if get_origin(base) is not None else base


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    for section, cls, title in _SCHEMA:
        group = p.add_argument_group(title)
        for f, hint in schema_fields(cls):
            flag = f.metadata.get("flag")
            if not flag:
                continue
            dest = f.name if section is None else f"{section}.{f.name}"
            kwargs: dict[str, Any] = {"dest": dest, "default": argparse.SUPPRESS, "help": f.metadata["help"]}
            if "const" in f.metadata:
                kwargs.update(action="store_const", const=f.metadata["const"])
            elif f.metadata.get("csv"):
                kwargs["type"] = _csv
            else:
                kwargs.update(type=_flag_type(hint), metavar=f.name.upper())
            if "choices" in f.metadata:
                kwargs["choices"] = f.metadata["choices"]()
            elif get_origin(hint) is Literal:
                kwargs["choices"] = list(get_args(hint))
            group.add_argument(flag, **kwargs)


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file of run settings (config.yaml of a run loads back); flags win over it")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue the interrupted run in --out (same settings)")
    again.add_argument("--force", action="store_true", help="replace the sadag run in --out (its contents are deleted)")
    _add_config_flags(p)


def _flag_layer(args: argparse.Namespace) -> dict[str, Any]:
    """The config values given as flags, nested by section."""
    layer: dict[str, Any] = {}
    names = {f.name for f, _ in schema_fields(RunConfig)}
    for dest, value in vars(args).items():
        section, _, name = dest.rpartition(".")
        if section:
            layer.setdefault(section, {})[name] = value
        elif dest in names:
            layer[dest] = value
    return layer


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """Defaults < preset < config file < flags (the preset is applied by apply_preset, below both)."""
    flags = _flag_layer(args)
    layers = [flags]
    if args.config:
        data = read_yaml(args.config)
        # the file's own model is what needs the opt-in; a --model typed here replaces it
        check_file_layer({k: v for k, v in data.items() if k != "model" or "model" not in flags}
                         if isinstance(data, dict) else data, args.config, bool(flags.get("allow_import")))
        layers.insert(0, data)
    return run_config_from_dict(merge_layers(*layers))


def _cmd_run(args: argparse.Namespace) -> int:
    return _run(config_from_args(args), args)


def _check_resume(cfg: RunConfig, args: argparse.Namespace) -> None:
    """--resume continues a run: typed at a missing or empty --out (a typo) it would silently start a new one.
    (Python's resume=True is resume-or-start: the benchmarks rely on it.)"""
    if not args.resume or not isinstance(cfg.out, str) or not cfg.out:
        return
    out = Path(cfg.out)
    if not out.exists() or (out.is_dir() and not any(p.name != LOCK for p in out.iterdir())):
        raise ConfigError(f"--resume: {cfg.out} {'is empty' if out.exists() else 'does not exist'}, so there is no "
                          "run to continue; check the --out path, or drop --resume to start the run")


def _run(cfg: RunConfig, args: argparse.Namespace) -> int:
    from .pipeline import run

    _check_resume(cfg, args)
    report = run(cfg, resume=args.resume, force=args.force, progress=ProgressPrinter(), export=not args.no_export)
    if distributed.ranks_from_env().is_main:  # under torchrun rank 0 speaks for all
        print(json.dumps(report, indent=2))
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)  # flags and config file merged: either may give the images
    if not cfg.calib_data:
        raise ConfigError("calibrate needs --calib-data (a real image folder or a set saved by `sadag generate`), "
                          "or calib_data in the config file; `sadag run` generates the images instead")
    return _run(cfg, args)


def _cmd_generate(args: argparse.Namespace) -> int:
    from .pipeline import generate_set

    cfg = config_from_args(args)
    _check_resume(cfg, args)
    out = generate_set(cfg, resume=args.resume, force=args.force, progress=ProgressPrinter())
    if distributed.ranks_from_env().is_main:
        print(f"saved the synthetic calibration set to {out}/images.pt (preview: {out}/grid.png)")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .data import ImageFolderDataset, make_loader
    from .evaluation import evaluate
    from .models import load_model
    from .pipeline import resolve_device

    device = resolve_device(args.device)
    if args.quantized:
        given = [flag for flag, value in (("--model", args.model), ("--weights", args.weights),
                                          ("--trust-checkpoint", args.trust_checkpoint)) if value]
        if given:
            raise ConfigError(f"{', '.join(given)}: an exported model carries its architecture and weights, so "
                              "--quantized reads neither; drop them (or drop --quantized to evaluate an FP model)")
        from .export import load_quantized
        from .models import DataSpec

        model, meta = load_quantized(args.quantized, allow_import=args.allow_import)
        spec, name = DataSpec.from_dict(meta["spec"]), f"{meta['model_name']} (quantized {args.quantized})"
    else:
        if not args.model:
            raise ConfigError("evaluate needs --model NAME (or --quantized FILE.safetensors)")
        model, spec = load_model(args.model, weights=args.weights, trust_checkpoint=args.trust_checkpoint,
                                 device=device)
        name = args.model
    dataset = ImageFolderDataset(args.data, spec, class_index=args.class_index, limit=args.limit)
    loader = make_loader(dataset, args.batch_size)
    metrics = evaluate(model.to(device), loader, device, progress=ProgressPrinter(), total=len(loader))
    bad = f"; NaN or infinite outputs for {metrics['nonfinite_images']}, counted as misses" \
        if metrics["nonfinite_images"] else ""
    print(f"{name}: top-1 {metrics['top1']:.2f}%  top-5 {metrics['top5']:.2f}%  ({metrics['num_images']} images{bad})")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .export import export_model, get_exporter, infer_exporter, load_quantized
    from .models import DataSpec

    source = Path(args.run) / "quantized.safetensors" if args.run else Path(args.quantized)
    fmt = args.format or infer_exporter(args.to).name
    _check_verify_args(args, fmt)  # before anything is written
    model, meta = load_quantized(source, allow_import=args.allow_import)
    spec = DataSpec.from_dict(meta["spec"])
    options = {"spec": spec, "opset": args.opset} if fmt == "onnx" else {}
    if fmt == "safetensors":
        from .config import QuantConfig

        options = {"model_name": meta["model_name"], "spec": spec, "quant_config": QuantConfig(**meta["quant_config"])}
    written = export_model(model, args.to, fmt, **options)
    print(f"wrote {written} ({get_exporter(fmt).description}) from {source}")
    if args.verify_data:
        from .data import ImageFolderDataset
        from .export import verify_onnx

        data = ImageFolderDataset(args.verify_data, spec, class_index=args.class_index, limit=args.limit or 20)
        images, labels = zip(*(data[i] for i in range(len(data))), strict=True)
        r = verify_onnx(written, model, torch.stack(images), torch.tensor(labels))
        print(f"onnxruntime vs PyTorch on {r['num_images']} images: max |logit diff| {r['max_abs_diff']:.3g}, "
              f"top-1 agreement {100 * r['top1_agreement']:.2f}%, top-1 PyTorch {100 * r['top1_torch']:.2f}% "
              f"/ ONNX {100 * r['top1_onnx']:.2f}%")
    return 0


def _check_verify_args(args: argparse.Namespace, fmt: str) -> None:
    if args.verify_data and fmt != "onnx":
        raise ConfigError("--verify-data compares onnxruntime with PyTorch: it needs --format onnx")
    if not args.verify_data and (args.class_index or args.limit is not None):
        given = " and ".join(f for f, v in (("--class-index", args.class_index), ("--limit", args.limit)) if v)
        raise ConfigError(f"{given} choose the images of --verify-data, which is not given: add it or drop them")
    if args.verify_data:
        from .data.folder import check_folder

        check_folder(Path(args.verify_data), "--verify-data folder")


def _export_formats() -> list[str]:
    from .export import list_exporters

    return [e.name for e in list_exporters()]


def _cmd_models(_args: argparse.Namespace) -> int:
    from .models import list_models

    print(f"{'name':24} {'input':>6} {'classes':>8}  weights")
    for info in list_models():
        print(f"{info.name:24} {info.input_size:>6} {info.num_classes:>8}  {info.weights}")
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def _field_help(name: str) -> str:
    return RunConfig.__dataclass_fields__[name].metadata["help"]


def _add_allow_import(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-import", action="store_true",
                   help="let the file's model name a module:factory to import and run (only for files you trust)")


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
    p.add_argument("--no-export", action="store_true", help="do not write quantized.safetensors")
    p.set_defaults(func=_cmd_calibrate)
    p = sub.add_parser("generate", help="synthesize a calibration set once, to reuse at several bit widths")
    _add_run_args(p)
    p.set_defaults(func=_cmd_generate)
    p = sub.add_parser("evaluate", help="top-1/top-5 of an FP model or an exported quantized model")
    p.add_argument("--model")
    p.add_argument("--weights")
    p.add_argument("--trust-checkpoint", action="store_true", help=_field_help("trust_checkpoint"))
    p.add_argument("--quantized", help="a quantized.safetensors written by `sadag run`")
    _add_allow_import(p)
    p.add_argument("--data", required=True, help="labelled image folder ROOT/<class>/<image>")
    p.add_argument("--class-index")
    p.add_argument("--batch-size", type=_positive, default=256)
    p.add_argument("--limit", type=_positive, help="at most this many images per class")
    p.add_argument("--device", default="auto", help=_field_help("device"))
    p.add_argument("--threads", type=_positive)
    p.set_defaults(func=_cmd_evaluate)
    p = sub.add_parser("export", help="export a calibrated model (QDQ ONNX, safetensors, ...)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="a run directory holding quantized.safetensors")
    src.add_argument("--quantized", help="a quantized.safetensors file")
    _add_allow_import(p)
    p.add_argument("--to", required=True, help="output file (its suffix picks the format unless --format is given)")
    p.add_argument("--format", choices=_export_formats(), help="export format (default: from the --to suffix)")
    p.add_argument("--opset", type=_positive, default=21, help="ONNX opset (21: UINT4 grids; 25: also UINT2)")
    p.add_argument("--verify-data", help="labelled image folder: compare onnxruntime with PyTorch on it")
    p.add_argument("--class-index")
    p.add_argument("--limit", type=_positive, help="images per class for --verify-data (default 20)")
    p.add_argument("--threads", type=_positive)
    p.set_defaults(func=_cmd_export)
    p = sub.add_parser("models", help="list the model zoo")
    p.set_defaults(func=_cmd_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if args.command in ("evaluate", "export") and args.threads:  # a run's threads are a checked config field
        torch.set_num_threads(args.threads)
    try:
        code = args.func(args)
        distributed.finish()
        return code
    except SadagError as exc:
        print(f"sadag: error{_where()}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sadag: interrupted; finished work is checkpointed: rerun with --resume to continue", file=sys.stderr)
        return 130
    except (torch.OutOfMemoryError, MemoryError) as exc:
        return _out_of_memory(exc)
    except RuntimeError as exc:
        if "can't allocate memory" in str(exc) or "out of memory" in str(exc):
            return _out_of_memory(exc)
        if _where() and distributed.is_comm_error(exc):
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            print(f"sadag: error{_where()}: lost contact with another rank ({first_line[:200]}); it probably failed: "
                  "see its message. Finished work is checkpointed: rerun the same command with --resume",
                  file=sys.stderr)
            return 4
        raise


def _where() -> str:
    """" (rank R of N, stage S)" under torchrun, else ""."""
    try:
        ranks = distributed.ranks_from_env()
    except SadagError:
        return ""
    return f" (rank {ranks.rank} of {ranks.world_size}, stage {distributed.stage_name()})" if ranks.enabled else ""


def _out_of_memory(exc: BaseException) -> int:
    first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    print(f"sadag: error: out of memory ({first_line}); finished work is checkpointed in the run directory: rerun "
          "the same command with --resume and a smaller --calib-batch-size, --gen-batch-size or --eval-batch-size",
          file=sys.stderr)
    return 3


if __name__ == "__main__":
    sys.exit(main())
