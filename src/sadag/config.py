"""Typed run configuration. The dataclasses below are the schema: the CLI flags, the YAML keys, the checks and
the run directory's fingerprint are all derived from their fields and field metadata.

Resolution order (docs/guarantees.md), lowest first: dataclass defaults < preset < config file < command-line
flags < values set explicitly in Python. Every config dataclass remembers which of its fields were set
explicitly (passed to ``__init__`` or assigned later), so an explicit value wins over the preset even when it
equals the default.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import math
import os
import re
import types
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from .errors import ConfigError

Neighbor = Literal["released", "random", "adversarial"]  # generation/sadag.py: how a neighbor direction is drawn
Precision = Literal["fp32", "bf16"]  # generation/genie.py: the FP model's arithmetic in Genie-D
BNScope = Literal["batch", "set"]  # generation/genie.py: over which images Genie-D matches BatchNorm statistics
SECTIONS = ("quant", "calib", "gen")
DEVICE_FORMS = "auto, cpu, cuda, cuda:N (N a GPU index), mps"
_DEVICE = re.compile(r"(auto|cpu|mps|cuda(:\d+)?)")


def setting(default: Any = dataclasses.MISSING, *, help: str, flag: str | None = None, **checks: Any) -> Any:  # noqa: A002
    """A config field. ``flag`` makes it a command-line flag; ``checks``: min, max, above and below (exclusive),
    choices (a callable returning the allowed values), csv (flag takes a comma list), const (flag stores this
    value, no argument), result=False (cannot change the result: not fingerprinted), trust=True (grants trust:
    never read from a config file, never written to one), before (what runs made before this setting existed
    did, when that is not its default: such a run resumes only at that value)."""
    meta = {"help": help, "flag": flag, **checks}
    if isinstance(default, list | dict):
        return field(default_factory=functools.partial(copy.deepcopy, default), metadata=meta)
    return field(default=default, metadata=meta)


def schema(cls: type) -> type:
    """@dataclass plus explicit-field tracking: fields passed to __init__ or assigned afterwards are explicit."""
    cls = dataclass(cls)
    init, names = cls.__init__, [f.name for f in fields(cls) if f.init]

    @functools.wraps(init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:  # noqa: N807
        init(self, *args, **kwargs)
        self.__dict__["_explicit"] = set(names[: len(args)]) | set(kwargs)

    def __setattr__(self, name: str, value: Any) -> None:  # noqa: N807
        object.__setattr__(self, name, value)
        if "_explicit" in self.__dict__ and name in self.__dataclass_fields__:
            self.__dict__["_explicit"].add(name)

    cls.__init__, cls.__setattr__ = __init__, __setattr__
    return cls


def explicit_fields(section: Any) -> frozenset[str]:
    """The names of the fields of a config dataclass that were set explicitly."""
    return frozenset(section.__dict__.get("_explicit", ()))


def _set_implicit(section: Any, name: str, value: Any) -> None:
    object.__setattr__(section, name, value)  # a preset's value: not explicit, a later preset may replace it


def _method_names() -> list[str]:
    from .methods import method_names

    return [*method_names(), "real"]


@schema
class QuantConfig:
    """What is quantized and how (docs/method.md section 3.1)."""

    w_bits: int = setting(4, help="weight bits", min=2, max=8)
    a_bits: int | None = setting(4, help="activation bits; None (or 'fp' in YAML) keeps activations full precision",
                                 min=2, max=8, none_word="fp")
    first_last_8bit: bool = setting(True, flag="--no-8bit-ends", const=False,
                                    help="quantize the first and last layers at the target bits too (default: "
                                         "first layer W8 with FP input, second layer's input A8, last layer W8A8)")
    fold_bn: bool = setting(False, flag="--fold-bn", const=True,
                            help="fold BatchNorm into the preceding conv before quantizing (deployable)")
    clip_search_p: float = setting(2.4, help="exponent p of the |w - Q(w)|^p clip-search error",
                                   above=0.0)  # at 0 every clip scores the same
    act_grid: Literal["affine", "symmetric"] = setting(
        "affine", flag="--act-grid",
        help="grid of an activation with negative values: affine (a zero point inside [0, 2^b - 1] over the "
             "clipped [min, max]) or symmetric (Genie's code: a signed grid over +-max|x|); non-negative "
             "activations take the unsigned grid either way")
    units: list[str] | None = setting(None, flag="--units", csv=True,
                                      help="comma-separated module names of the reconstruction units (default: "
                                           "detected)")

    def validate(self) -> None:
        validate_section(self)


@schema
class CalibConfig:
    """Block reconstruction (Genie-M / BRECQ / QDrop)."""

    iters: int = setting(20_000, flag="--calib-iters", min=0, help="reconstruction iterations per unit")
    batch_size: int = setting(32, flag="--calib-batch-size", min=1, help="reconstruction minibatch size")
    lr_round: float = setting(1e-3, min=0.0, help="learning rate of AdaRound's rounding variables V")
    lr_w_scale: float = setting(1e-4, min=0.0, help="learning rate of the weight step size (Genie); 0 keeps it fixed")
    lr_a_scale: float = setting(4e-5, min=0.0, help="learning rate of the LSQ activation step size, cosine annealed")
    round_weight: float = setting(1.0, min=0.0, help="weight of AdaRound's rounding regulariser")
    warmup: float = setting(0.2, min=0.0, below=1.0, help="fraction of the iterations without the regulariser")
    # the regulariser is 1 - |2h(V) - 1|^beta: beta > 0 pushes h to 0 or 1; at 0 it is constant (no push), below 0
    # it pushes h to 1/2, where it is infinite (quantization/quantizers.py WeightQuantizer.regularizer)
    beta: tuple[float, float] = setting((20.0, 2.0), above=0.0, help="AdaRound's annealed beta, from first to last")
    # QDrop as implemented (quantization/quantizers.py ActQuantizer.forward, reconstruction/reconstruct.py): each
    # element of a unit's input and of every activation quantizer's output keeps its QUANTIZED value with
    # probability drop_prob and takes its full-precision value otherwise. 0.5 is QDrop's setting; 0 turns QDrop
    # off (always quantized, plain BRECQ/Genie-M) and so does 1; 0.01 would feed 99% FP values.
    drop_prob: float = setting(0.5, min=0.0, max=1.0,
                               help="QDrop: probability that an element keeps its quantized value (else its FP "
                                    "value) during calibration; 0 = QDrop off")
    anneal_w_scale: bool = setting(True, help="cosine-anneal the weight step size's lr too, as Genie's reference code "
                                              "does (one scheduler for both step sizes)")
    sampling: Literal["epochs", "replacement"] = setting("epochs", flag="--calib-sampling",
                                                         help="minibatches: permuted epochs without replacement (as "
                                                              "Genie) or drawn with replacement")
    engine: Literal["auto", "eager", "fused", "compiled"] = setting(
        "auto", flag="--engine", before="eager",
        help="reconstruction step: eager (the plain step), fused (eager with each BatchNorm fused into the "
             "quantized conv feeding it and, on a CPU, channels_last activations: the same function, other "
             "rounding), compiled (torch.compile; CUDA graphs on GPU) or auto (compiled on CUDA, fused elsewhere)")
    drop_draw: Literal["bytes", "uniform"] = setting(
        "bytes", flag="--drop-draw", before="uniform",
        help="QDrop's random masks: from random bytes (a generator draw serves 8 elements at drop_prob 0.5; "
             "drop_prob exact for multiples of 1/65536, else to 2^-32) or from float32 uniforms (the draw of "
             "runs made before this setting existed; slower on a CPU; another random stream)")
    tf32: bool = setting(False, flag="--tf32", const=True,
                         help="CUDA only: TF32 convolutions and matmuls in the reconstruction steps (off: strict fp32 "
                              "there, whatever torch's global flags say)")

    def resolved_engine(self, device_type: str) -> str:
        """The engine a run on this device type uses. auto: compiled on CUDA (launch-bound steps, CUDA graphs);
        fused elsewhere, where inductor took about 2 minutes per unit shape to compile on 2 busy cores for a
        step about 1.15x faster: it does not pay."""
        if self.engine == "auto":
            return "compiled" if device_type == "cuda" else "fused"
        return self.engine

    def validate(self) -> None:
        validate_section(self)


@schema
class GenConfig:
    """Synthetic calibration data (docs/method.md sections 2 and 4)."""

    num_images: int = setting(1024, flag="--num-images", min=1, help="synthetic calibration images")
    batch_size: int = setting(128, flag="--gen-batch-size", min=1,
                              help="images per generation batch (each batch has its own generator and latents)")
    latent_dim: int = setting(256, min=1, help="Genie-D latent size")
    genie_iters: int = setting(4000, flag="--gen-iters", min=0, help="Genie-D iterations per batch")
    lr_z: float = setting(0.1, flag="--lr-z", min=0.0,
                          help="Genie-D latents' learning rate (0.01 if the set warns of near-copies)")
    lr_g: float = setting(0.01, min=0.0, help="Genie-D generator learning rate")
    g_decay: float = setting(0.95, min=0.0, max=1.0, help="generator lr multiplier every g_decay_every iterations")
    g_decay_every: int = setting(100, min=1, help="iterations between generator lr decays")
    plateau_patience: int = setting(100, min=0, help="plateau scheduler patience of the latents' lr")
    min_lr_z: float = setting(1e-4, min=0.0, help="lowest latents' lr of the plateau scheduler")
    swing: bool = setting(True, help="swing convolution during Genie-D")
    parallel_batches: int = setting(0, flag="--parallel-batches", min=0,
                                    help="Genie-D/ZeroQ batches optimized in one pass; 0 = auto (CPU: 1, GPU: all "
                                         "that fit in a quarter of its memory)")
    precision: Precision = setting("fp32", flag="--gen-precision",
                                   help="Genie-D: the FP model's forward and backward in fp32 or under bf16 autocast "
                                        "(the generator, losses and optimizer stay fp32)")
    bn_scope: BNScope = setting("batch", flag="--bn-scope",
                                help="Genie-D: match BatchNorm statistics per batch (Genie) or over the whole set "
                                     "(DGH, WACV 2025: every batch in one pass, one process)")
    # SADAG stages B and C
    warmup_calib_iters: int = setting(4000, flag="--warmup-calib-iters", min=0,
                                      help="SADAG stage B: reconstruction iterations per unit of the warm-up model")
    refine_iters: int = setting(500, flag="--refine-iters", min=0, help="SADAG stage C: iterations per batch")
    refine_parallel: int = setting(1, flag="--refine-parallel", min=1,
                                   help="SADAG stage C: batches refined in one pass. 1 = one by one, the paper's "
                                        "diversity term (a batch against the finished earlier batches); more "
                                        "changes it: a batch's term also sees the other batches of its pass at "
                                        "their current step")
    refine_lr_z: float = setting(1e-5, min=0.0, help="SADAG refinement: latents' learning rate")
    refine_lr_g: float = setting(1e-4, min=0.0, help="SADAG refinement: generator learning rate")
    refine_min_lr_z: float = setting(1e-6, min=0.0, help="SADAG refinement: lowest latents' lr")
    refine_g_decay: float = setting(0.95, min=0.0, max=1.0, help="SADAG refinement: generator lr decay per iteration")
    lambda_gm: float = setting(1.0, flag="--lambda-gm", min=0.0, help="SADAG: weight of gradient matching L_GM")
    lambda_div: float = setting(1.0, flag="--lambda-div", min=0.0, help="SADAG: weight of the diversity term L_D")
    rho: float = setting(1.0, flag="--rho", min=0.0, help="SADAG: latent distance of the neighbor")
    zeta: float = setting(0.0, min=0.0, help="SADAG: margin of the diversity term")
    neighbor: Neighbor = setting("released", flag="--neighbor",
                                  help="SADAG: how the latent neighbor is chosen (released: output noise back-"
                                       "propagated to z, as the authors' code effectively does)")
    lowpass: float = setting(0.0, flag="--lowpass", min=0.0,
                             help="SynQ's Gaussian low-pass D0 (frequency index) applied to the finished synthetic "
                                  "set; 0 = off")
    genie_set: str | None = setting(None, flag="--genie-set",
                                    help="genie, SADAG: start from the Genie-D batches of a set saved by `sadag "
                                         "generate --method genie` (skips Genie-D; genie then only applies "
                                         "--lowpass)")
    warmup_model: str | None = setting(None, flag="--warmup-model",
                                       help="SADAG: use this quantized.safetensors (same model, target bits) as the "
                                            "warm-up model (skips stage B)")
    # ZeroQ baseline
    zeroq_iters: int = setting(500, flag="--zeroq-iters", min=0, help="ZeroQ iterations per batch")
    zeroq_lr: float = setting(0.5, min=0.0, help="ZeroQ learning rate")

    def validate(self) -> None:
        validate_section(self)


# Iteration budgets, as data: section -> field -> value, applied below everything set explicitly.
# "paper" is the papers' budget (docs/method.md); "fast" finishes ResNet-20 in minutes on 2 CPU cores; "smoke"
# takes seconds (tests).
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "paper": {},
    "fast": {
        "calib": {"iters": 2000},
        # Genie-D 100 steps, stage B 150, stage C 60 (Genie-D 1,000 before 2026-11-30, 300 until 2026-12-02):
        # ResNet-20 W4A4 and W2A4 level with 300 steps over three seeds each, 2 minutes sooner on 2 CPU cores
        # (README, "The fast preset"; benchmarks/frontier.py)
        "gen": {"num_images": 256, "genie_iters": 100, "warmup_calib_iters": 150, "refine_iters": 60,
                "zeroq_iters": 500},
    },
    "smoke": {
        "calib": {"iters": 20, "batch_size": 16},
        "gen": {"num_images": 32, "batch_size": 16, "genie_iters": 10, "warmup_calib_iters": 5,
                "refine_iters": 5, "zeroq_iters": 10, "plateau_patience": 5},
    },
}


@schema
class RunConfig:
    """One `sadag run`: model, data, method, bits, budgets, output."""

    model: str = setting("resnet20_cifar10", flag="--model",
                         help="zoo name (see `sadag models`) or module.path:factory")
    weights: str | None = setting(None, flag="--weights", help="checkpoint file (default: the model's download "
                                                               "location)")
    method: str = setting("sadag", flag="--method", choices=_method_names,
                          help="how the calibration images are made (real: sampled from --calib-data)")
    method_options: dict[str, Any] = setting({}, help="options of a registered generation method that has its own "
                                                      "config class (YAML/Python)")
    bits: str | None = setting(None, flag="--bits", help="W/A, e.g. 4/4, 3/3, 2/4, 4/fp: shorthand for quant.w_bits "
                                                         "and quant.a_bits (default 4/4)")
    preset: str = setting("paper", flag="--preset", choices=lambda: list(PRESETS),
                          help="iteration budget (explicit settings win over it)")
    calib_data: str | None = setting(None, flag="--calib-data",
                                     help="calibrate on this: a real image folder or a set saved by `sadag generate`")
    num_calib: int | None = setting(None, flag="--num-calib", min=1,
                                    help="calibration images taken from --calib-data (default: gen.num_images from "
                                         "a real folder, all of a saved set)")
    eval_data: str | None = setting(None, flag="--eval-data", help="labelled image folder to measure top-1/top-5 on")
    class_index: str | None = setting(None, flag="--class-index",
                                      help="file of class folder names, one per line, in label order")
    eval_batch_size: int = setting(256, flag="--eval-batch-size", min=1, result=False, help="evaluation batch size")
    eval_limit: int | None = setting(None, flag="--eval-limit", min=1,
                                     help="evaluate on at most this many images per class")
    out: str | None = setting(None, flag="--out", result=False,
                              help="run directory (never overwritten without --resume/--force)")
    seed: int = setting(0, flag="--seed", min=0, max=2**32 - 1, help="seed of every random choice")
    device: str = setting("auto", flag="--device", pattern=(_DEVICE, DEVICE_FORMS), help=f"one of {DEVICE_FORMS}")
    threads: int | None = setting(None, flag="--threads", min=1, result=False, help="CPU threads for torch")
    allow_import: bool = setting(False, flag="--allow-import", const=True, result=False, trust=True,
                                 help="let a config file's `model: module:factory` import and run that code")
    trust_checkpoint: bool = setting(False, flag="--trust-checkpoint", const=True, result=False, trust=True,
                                     help="unpickle --weights with arbitrary Python objects: this can run any code "
                                          "the file contains; only for files you trust")
    quant: QuantConfig = field(default_factory=QuantConfig)
    calib: CalibConfig = field(default_factory=CalibConfig)
    gen: GenConfig = field(default_factory=GenConfig)

    def validate(self) -> None:
        validate_run(self)


_SECTION_TYPES: dict[str, type] = {"quant": QuantConfig, "calib": CalibConfig, "gen": GenConfig}


# --- checks ---------------------------------------------------------------------------------------


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _label(f: dataclasses.Field, path: str) -> str:
    flag = f.metadata.get("flag")
    return f"{path} ({flag})" if flag else path


def _bad(f: dataclasses.Field, path: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"{_label(f, path)}: got {value!r}; allowed: {allowed}")


def _describe(hint: Any) -> str:
    if get_origin(hint) is Literal:
        return "one of " + ", ".join(map(str, get_args(hint)))
    if get_origin(hint) in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(hint))
    if hint is type(None):
        return "null"
    if get_origin(hint) in (list, tuple):
        return f"a list of {_describe(get_args(hint)[0])}" + (f" (exactly {len(get_args(hint))})"
                                                               if get_origin(hint) is tuple else "")
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(hint, str(hint))


def _coerce(value: Any, hint: Any) -> tuple[bool, Any]:
    """(matches, normalized value) of ``value`` against a type hint; ints become floats for float fields."""
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        for arg in get_args(hint):
            ok, out = _coerce(value, arg)
            if ok:
                return True, out
        return False, value
    if origin is Literal:
        return value in get_args(hint), value
    if origin is list:
        ok = isinstance(value, list | tuple) and all(_coerce(v, get_args(hint)[0])[0] for v in value)
        return ok, list(value) if ok else value
    if origin is tuple:
        args = get_args(hint)
        parts = [_coerce(v, a) for v, a in zip(value, args, strict=False)] if isinstance(value, list | tuple) else []
        ok = len(parts) == len(args) == len(value) and all(p[0] for p in parts)
        return ok, tuple(p[1] for p in parts) if ok else value
    if origin is dict:
        return isinstance(value, dict) and all(isinstance(k, str) for k in value), value
    if hint is type(None):
        return value is None, value
    if hint is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    return isinstance(value, hint), value


def _optional(hint: Any) -> bool:
    return get_origin(hint) in (Union, types.UnionType) and type(None) in get_args(hint)


def _check_number(f: dataclasses.Field, path: str, value: Any, number: Any) -> None:
    """``number`` (``value`` itself, or an element of it) is finite and within the field's bounds."""
    if not isinstance(number, int | float):
        return
    one = number is value
    if isinstance(number, float) and not math.isfinite(number):  # NaN fails every comparison: refuse it first
        raise _bad(f, path, value, "a finite number" if one else "finite numbers")
    lo, hi, above, below = (f.metadata.get(k) for k in ("min", "max", "above", "below"))
    if ((lo is not None and number < lo) or (hi is not None and number > hi) or (above is not None and number <= above)
            or (below is not None and number >= below)):
        bounds = [f">= {lo}" if lo is not None else "", f"<= {hi}" if hi is not None else "",
                  f"> {above}" if above is not None else "", f"< {below}" if below is not None else ""]
        kind = _describe(type(number))  # not None here: "an integer >= 1", not "an integer or null >= 1"
        kind = kind if one else f"{kind.split(' ', 1)[1]}s"  # a pair's: "numbers > 0.0"
        raise _bad(f, path, value, f"{kind} " + " and ".join(b for b in bounds if b))


def _check_field(f: dataclasses.Field, hint: Any, value: Any, path: str) -> Any:
    meta = f.metadata
    if "none_word" in meta and value == meta["none_word"]:
        value = None
    ok, value = _coerce(value, hint)
    if not ok:
        raise _bad(f, path, value, _describe(hint) + (f" or {meta['none_word']!r}" if "none_word" in meta else ""))
    if value == "" and _optional(hint):  # "" would read as not given: --calib-data "" would silently generate
        raise _bad(f, path, value, "a non-empty string, or leave it out")
    if value is None or isinstance(value, bool):
        return value
    for number in value if isinstance(value, tuple) else (value,):  # each element of a pair (calib.beta) too
        _check_number(f, path, value, number)
    if "choices" in meta and value not in meta["choices"]():
        raise _bad(f, path, value, ", ".join(meta["choices"]()))
    if "pattern" in meta and not meta["pattern"][0].fullmatch(value):
        raise _bad(f, path, value, meta["pattern"][1])
    return value


def validate_section(section: Any, path: str = "") -> None:
    """Check the type and range of every field of a config dataclass, normalizing in place (1 -> 1.0 for
    float fields, lists -> tuples for tuple fields) without marking anything explicit."""
    prefix = f"{path}." if path else ""
    hints = _hints(type(section))
    for f in fields(section):
        if f.name in _SECTION_TYPES and type(section) is RunConfig:
            continue
        _set_implicit(section, f.name, _check_field(f, hints[f.name], getattr(section, f.name), prefix + f.name))


def check_device(name: Any) -> str:
    """The device string if it has one of the valid forms, else a ConfigError listing them."""
    f = RunConfig.__dataclass_fields__["device"]
    return _check_field(f, str, name, "device")


def validate_run(cfg: RunConfig) -> None:
    """Every field of a run config, its sections and its method's options: types, ranges, choices."""
    for name, cls in _SECTION_TYPES.items():
        if not isinstance(getattr(cfg, name), cls):
            raise ConfigError(f"{name}: got {getattr(cfg, name)!r}; allowed: a {cls.__name__} (in a config file: a "
                              f"mapping of its fields)")
        validate_section(getattr(cfg, name), name)
    validate_section(cfg)
    if cfg.bits is not None:
        parse_bits(cfg.bits)
    method_options(cfg)


def method_options(cfg: RunConfig) -> Any:
    """The method's own config dataclass filled from ``cfg.method_options`` (None for methods without one)."""
    if cfg.method == "real":
        options_cls = None
    else:
        from .methods import get_method

        options_cls = get_method(cfg.method).config
    if options_cls is None:
        if cfg.method_options:
            raise ConfigError(f"method_options: method {cfg.method!r} takes no options, got {cfg.method_options!r}")
        return None
    options = _build(options_cls, cfg.method_options, "method_options")
    validate_section(options, "method_options")
    return options


def parse_bits(bits: str) -> tuple[int, int | None]:
    """Parse "W/A" such as "4/4", "2/4" or "4/fp"."""
    parts = [p for p in str(bits).lower().replace("w", "").replace("a", "/").split("/") if p]
    if len(parts) != 2:
        raise ConfigError(f"bits (--bits): got {bits!r}; allowed: W/A, e.g. 4/4, 2/4 or 4/fp")
    try:
        w, a = int(parts[0]), None if parts[1] == "fp" else int(parts[1])
    except ValueError as exc:
        raise ConfigError(f"bits (--bits): got {bits!r}; allowed: W/A with integers 2..8 or 'fp'") from exc
    QuantConfig(w_bits=w, a_bits=a).validate()
    return w, a


def bits_label(quant: QuantConfig) -> str:
    return f"{quant.w_bits}/{quant.a_bits if quant.a_bits is not None else 'fp'}"


# --- resolution -----------------------------------------------------------------------------------


def _fold_bits(cfg: RunConfig) -> None:
    """``bits`` is a shorthand for quant.w_bits/a_bits: fold it in, refusing a contradiction."""
    if cfg.bits is None:
        return
    w, a = parse_bits(cfg.bits)
    explicit = explicit_fields(cfg.quant)
    for name, value in (("w_bits", w), ("a_bits", a)):
        if name in explicit and getattr(cfg.quant, name) != value:
            raise ConfigError(f"bits {cfg.bits!r} contradicts quant.{name}={getattr(cfg.quant, name)!r}; give one "
                              "of them (bits is a shorthand for quant.w_bits/a_bits)")
        setattr(cfg.quant, name, value)
    _set_implicit(cfg, "bits", None)


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def apply_preset(cfg: RunConfig) -> RunConfig:
    """The resolved, validated copy of ``cfg``: dataclass defaults < preset < explicit values (idempotent).

    A config built from a file or flags (``load_config``, the CLI) has all of their values explicit, so the
    order defaults < preset < file < flags < Python assignments holds for every entry point.
    """
    out = copy.deepcopy(cfg)
    preset = PRESETS.get(out.preset) if isinstance(out.preset, str) else None
    if preset is None:
        raise ConfigError(f"preset (--preset): got {out.preset!r}; allowed: {', '.join(PRESETS)}")
    validate_run(out)  # types first, so the preset is never merged into a list or a string
    for name in SECTIONS:  # every value not set explicitly: the preset's, else the default
        section, values = getattr(out, name), preset.get(name, {})
        for f in fields(section):
            if f.name not in explicit_fields(section):
                _set_implicit(section, f.name, copy.deepcopy(values[f.name]) if f.name in values else _default(f))
    _fold_bits(out)
    validate_run(out)
    return out


# The gen settings each built-in method reads (the code that reads them: generation/genie.py, sadag.py, zeroq.py,
# noise.py, builtin.py; lowpass: the pipeline filters any method's set). A setting given to a method that does not
# read it is refused; a method registered elsewhere is not checked (sadag cannot know what it reads).
_GENIE_D_READS = ("num_images", "batch_size", "latent_dim", "genie_iters", "lr_z", "lr_g", "g_decay", "g_decay_every",
                  "plateau_patience", "min_lr_z", "swing", "parallel_batches", "precision", "bn_scope", "genie_set",
                  "lowpass")
METHOD_GEN_READS: dict[str, tuple[str, ...]] = {
    "noise": ("num_images", "lowpass"),
    "zeroq": ("num_images", "batch_size", "parallel_batches", "plateau_patience", "min_lr_z", "zeroq_iters",
              "zeroq_lr", "lowpass"),
    "genie": _GENIE_D_READS,
    "sadag": (*_GENIE_D_READS, "warmup_calib_iters", "warmup_model", "refine_iters", "refine_parallel", "refine_lr_z",
              "refine_lr_g", "refine_min_lr_z", "refine_g_decay", "lambda_gm", "lambda_div", "rho", "zeta",
              "neighbor"),
}
# settings naming an input that only some methods read: refused with any other method (registered ones too)
_METHOD_INPUTS = ("genie_set", "warmup_model")
# what only calibration and evaluation read: generating a set alone (sadag generate, sadag.synthesize) reads none
_RUN_ONLY = {"calib_data": "--calib-data", "num_calib": "--num-calib", "eval_data": "--eval-data",
             "eval_limit": "--eval-limit", "class_index": "--class-index"}
_CALIB_DATA_READS = ("num_images",)  # the gen setting read with --calib-data: a real folder's image count


def check_unused_settings(cfg: RunConfig, command: Literal["run", "generate"] = "run") -> None:
    """Refuse a setting that this run would not read (a setting given is honoured or refused, never dropped).
    ``command``: "generate" makes a set only (sadag generate, sadag.synthesize): it neither calibrates nor
    evaluates."""
    if command == "generate":
        _check_generate_only(cfg)
    if cfg.method == "real" and not cfg.calib_data:
        raise ConfigError("method real samples real images: give --calib-data DIR (a folder of real images)")
    if cfg.num_calib is not None and not cfg.calib_data:
        raise ConfigError(f"num_calib (--num-calib) {cfg.num_calib}: it counts the images taken from --calib-data, "
                          "and this run has none; a synthetic set's size is gen.num_images (--num-images)")
    for name, flag, value in (("eval_limit", "--eval-limit", cfg.eval_limit),
                              ("class_index", "--class-index", cfg.class_index)):
        if value is not None and not cfg.eval_data:  # calibration ignores labels
            raise ConfigError(f"{name} ({flag}) {value}: it applies to the images of --eval-data, and this run has "
                              "none: give --eval-data or drop it")
    for name in _METHOD_INPUTS:
        if getattr(cfg.gen, name) is None:
            continue
        methods = _readers(name)
        source = f"calibrates on --calib-data {cfg.calib_data}" if cfg.calib_data else f"uses method {cfg.method!r}"
        if cfg.calib_data or cfg.method not in methods:
            raise ConfigError(f"{_gen_label(name)} is read by method {' and '.join(methods)} when it generates "
                              f"images; this run {source}: drop it")
    if cfg.calib_data:
        _check_no_generation(cfg)
    elif cfg.method in METHOD_GEN_READS:
        _check_method_reads(cfg)


def _readers(name: str) -> list[str]:
    """The built-in methods that read gen setting ``name``."""
    return [m for m, reads in METHOD_GEN_READS.items() if name in reads]


def _gen_label(name: str) -> str:
    return _label(GenConfig.__dataclass_fields__[name], f"gen.{name}")


def _given_unread(cfg: RunConfig, reads: tuple[str, ...]) -> list[str]:
    """The gen settings set explicitly to another value than the preset's that are not in ``reads``. A value equal
    to the preset's passes: a run's saved config.yaml gives every field, and must load back whatever its method."""
    preset = PRESETS[cfg.preset].get("gen", {})
    return [f.name for f in fields(cfg.gen) if f.name not in reads and f.name in explicit_fields(cfg.gen)
            and getattr(cfg.gen, f.name) != preset.get(f.name, _default(f))]


def _check_method_reads(cfg: RunConfig) -> None:
    """Refuse gen settings that the run's built-in method never reads (they would change nothing)."""
    unread = _given_unread(cfg, METHOD_GEN_READS[cfg.method])
    if unread:
        given = "; ".join(f"{_gen_label(n)} {getattr(cfg.gen, n)!r} (read by {', '.join(_readers(n))})"
                          for n in unread)
        it, they = ("it", "it") if len(unread) == 1 else ("them", "they")
        raise ConfigError(f"method {cfg.method!r} does not read {given}, so {they} would change nothing: drop {it}, "
                          f"or choose a method that reads {it}")


def _check_generate_only(cfg: RunConfig) -> None:
    given = [f"{name} ({flag})" for name, flag in _RUN_ONLY.items() if getattr(cfg, name) is not None]
    if given:
        raise ConfigError(f"{', '.join(given)}: generating a set (sadag generate) neither calibrates nor evaluates, "
                          "so it reads none of them: drop them, or use `sadag run` / `sadag calibrate`")


def _check_no_generation(cfg: RunConfig) -> None:
    """With --calib-data no image is generated: refuse a method and the generation settings set explicitly.
    A value equal to the preset's passes: a run's saved config.yaml gives every field, and must load back."""
    default_method = RunConfig.__dataclass_fields__["method"].default
    if cfg.method not in (default_method, "real"):
        raise ConfigError(f"method (--method) {cfg.method!r} generates calibration images, and this run calibrates "
                          f"on --calib-data {cfg.calib_data}, so it would make none: drop --method (a saved set "
                          "keeps the method that made it), or drop --calib-data to generate")
    unread = _given_unread(cfg, _CALIB_DATA_READS)
    if unread:
        name = unread[0]
        raise ConfigError(f"{_gen_label(name)} {getattr(cfg.gen, name)!r} applies to generated images, and this run "
                          f"calibrates on --calib-data {cfg.calib_data}, so none are generated: drop it"
                          + (" (to filter a saved Genie set: --method genie --genie-set DIR --lowpass D0)"
                             if name == "lowpass" else ""))


def check_input_paths(cfg: RunConfig) -> None:
    """The files and folders a run reads exist and are of the right kind: checked before the run directory is
    made, so that a typo does not leave a directory that blocks the corrected command."""
    wanted = (("calib_data", "--calib-data", cfg.calib_data, None),
              ("eval_data", "--eval-data", cfg.eval_data, "folder"),
              ("class_index", "--class-index", cfg.class_index, "file"),
              ("gen.genie_set", "--genie-set", cfg.gen.genie_set, None),
              ("gen.warmup_model", "--warmup-model", cfg.gen.warmup_model, "file"))
    for name, flag, value, kind in wanted:
        if value is None:
            continue
        p = Path(value)
        if not p.exists():
            raise ConfigError(f"{name} ({flag}) {value} does not exist")
        if (kind == "file" and not p.is_file()) or (kind == "folder" and not p.is_dir()):
            raise ConfigError(f"{name} ({flag}) {value} is a {'folder' if p.is_dir() else 'file'}; it must be a {kind}")
    _check_inputs_outside_out(cfg, [(name, flag, value) for name, flag, value, _ in wanted])


def _check_inputs_outside_out(cfg: RunConfig, inputs: list[tuple[str, str, str | None]]) -> None:
    """A run writes into --out and --force empties it: an input inside it would be overwritten or deleted."""
    if not cfg.out:
        return
    out = Path(cfg.out).resolve()
    for name, flag, value in [*inputs, ("weights", "--weights", cfg.weights)]:
        if value is not None and out in (p := Path(value).resolve(), *p.parents):
            raise ConfigError(f"{name} ({flag}) {value} lies inside the run directory --out {cfg.out}, which the run "
                              "writes into (and --force empties): choose another --out, or move the input out of it")


def check_bn_scope(gen: GenConfig) -> None:
    """gen.bn_scope 'set' optimizes every Genie-D batch in one pass: batches of one size, none split off."""
    if gen.bn_scope != "set":
        return
    count = math.ceil(gen.num_images / gen.batch_size)
    if count > 1 and gen.num_images % gen.batch_size:
        raise ConfigError(f"gen.bn_scope 'set' optimizes every batch in one pass, which needs batches of one size: "
                          f"gen.num_images {gen.num_images} is not a multiple of gen.batch_size {gen.batch_size}")
    if gen.parallel_batches not in (0, count):
        raise ConfigError(f"gen.bn_scope 'set' optimizes all {count} batches in one pass; gen.parallel_batches "
                          f"{gen.parallel_batches} would split them: leave it 0")


def check_genie_input_size(input_size: int) -> None:
    """The Genie generator starts at S/4 x S/4 and upsamples twice by 2: it makes S x S images for S = 4k only."""
    if input_size % 4 != 0 or input_size < 4:
        raise ConfigError(f"the Genie generator (methods genie and sadag) makes images whose size is a multiple of 4, "
                          f"and this model's input size is {input_size}: use --method zeroq or --method noise for it")


def check_generation(cfg: RunConfig, input_size: int | None = None) -> None:
    """For a resolved config: what Genie-D would refuse once running, refused before the run directory exists
    (it runs in genie and sadag when they make their own Genie-D batches). ``input_size``: the model's, once it is
    loaded (SADAG's refinement runs the Genie generator also on the batches of a saved set)."""
    if cfg.method not in _readers("genie_iters") or cfg.calib_data:  # no Genie-D, no Genie generator
        return
    if not cfg.gen.genie_set:
        check_bn_scope(cfg.gen)
    if input_size is not None:
        check_genie_input_size(input_size)


def check_calibration_minibatch(cfg: RunConfig) -> None:
    """For a resolved config that will calibrate: refuse a minibatch larger than the calibration set where the
    config alone tells its size, before any image is generated (a saved set's size is known when it is loaded:
    reconstruct checks that)."""
    if cfg.calib_data is None:
        count, source = cfg.gen.num_images, "gen.num_images (--num-images)"
    elif cfg.num_calib is not None:
        count, source = cfg.num_calib, "num_calib (--num-calib)"
    else:
        return
    check_minibatch(cfg.calib.batch_size, count, source)


def check_minibatch(batch_size: int, count: int, source: str = "") -> None:
    if batch_size > count:
        raise ConfigError(f"calib.batch_size (--calib-batch-size): got {batch_size}, more than the {count} calibration "
                          f"images{f' of {source}' if source else ''}; set it to at most {count} or calibrate on "
                          "more images")


# --- dictionaries, files, fingerprints ------------------------------------------------------------


def _build(cls: type, data: Any, path: str) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: got {data!r}; allowed: a mapping of {cls.__name__} fields")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known, key=str)  # keys of any YAML type (1: a) beside strings
    if unknown:
        raise ConfigError(f"{path}: unknown keys {', '.join(map(str, unknown))}; valid: {', '.join(sorted(known))}")
    return cls(**data)


def run_config_from_dict(data: Any) -> RunConfig:
    """A RunConfig whose every given value (top level and in the quant/calib/gen sections) is explicit."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"a run config must be a mapping of its fields, got {type(data).__name__}")
    data = dict(data)
    sections = {name: _build(cls, data.pop(name), name) for name, cls in _SECTION_TYPES.items() if name in data}
    return _build(RunConfig, {**data, **sections}, "config")


def _bits_layer(layer: dict[str, Any]) -> dict[str, Any]:
    """A layer's ``bits`` turned into its quant.w_bits/a_bits (refusing a contradiction within the layer)."""
    w, a = parse_bits(layer.pop("bits"))
    quant = layer.get("quant", {})
    if not isinstance(quant, Mapping):
        return layer  # the schema check reports the malformed section
    for name, value in (("w_bits", w), ("a_bits", a)):
        given = None if name == "a_bits" and quant.get(name) == "fp" else quant.get(name, value)
        if given != value:
            raise ConfigError(f"bits {bits_label(QuantConfig(w, a))!r} contradicts quant.{name}={quant[name]!r} "
                              "given in the same place; give one of them")
    return {**layer, "quant": {**quant, "w_bits": w, "a_bits": a}}


def merge_layers(*layers: Mapping[str, Any]) -> dict[str, Any]:
    """Config dicts merged field by field, later layers winning. ``bits`` in a layer becomes that layer's
    quant.w_bits/a_bits first, so a later ``--bits`` beats an earlier ``quant: {w_bits: ...}`` and vice versa."""
    merged: dict[str, Any] = {}
    for layer in layers:
        layer = dict(layer)
        if layer.get("bits") is not None:
            layer = _bits_layer(layer)
        for key, value in layer.items():
            if key in _SECTION_TYPES and isinstance(value, Mapping) and isinstance(merged.get(key), dict):
                merged[key] = {**merged[key], **value}
            else:
                merged[key] = dict(value) if isinstance(value, Mapping) else value
    return merged


def _trust_fields() -> list[str]:
    return [f.name for f in fields(RunConfig) if f.metadata.get("trust")]


def check_file_layer(data: Any, source: str, allow_import: bool) -> None:
    """A config file may not grant trust, and names code to import only with the caller's opt-in."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source} must hold a mapping of config keys, got {type(data).__name__}")
    granted = [k for k in _trust_fields() if k in data]
    if granted:
        raise ConfigError(f"{source} sets {', '.join(granted)}: a file cannot grant trust; pass "
                          f"{', '.join('--' + k.replace('_', '-') for k in granted)} on the command line instead")
    model = data.get("model")
    if isinstance(model, str) and ":" in model and not allow_import:
        raise ConfigError(f"{source} names model {model!r}, which imports and runs that Python code; pass "
                          "--allow-import (Python: allow_import=True) if you trust the file, or give the model "
                          "with --model")


def load_config(path: str, *, allow_import: bool = False, **overrides: Any) -> RunConfig:
    """A RunConfig from a YAML file (all its values explicit), with ``overrides`` (a flags-like layer) on top."""
    data = read_yaml(path)
    check_file_layer(data, str(path), allow_import)
    return run_config_from_dict(merge_layers(data, overrides))


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader without anchors or aliases (a few hundred bytes of aliases expand to gigabytes), and with
    YAML 1.2 floats, so that ``lr: 1e-3`` is a number rather than a string."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise ConfigError(f"{self.name}: YAML anchors and aliases (&name, *name) are not accepted, at line "
                              f"{event.start_mark.line + 1}; write the values out")
        return super().compose_node(parent, index)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        # PyYAML keeps the last of two equal keys: a second `quant:` block would silently drop the first
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, str | int | float | bool):
                continue  # an unhashable key: the base class refuses it
            if key in seen:
                raise ConfigError(f"{self.name}: key {key!r} appears twice in one mapping (line "
                                  f"{key_node.start_mark.line + 1}); keep one")
            seen.add(key)
        return super().construct_mapping(node, deep)


class _Dumper(yaml.SafeDumper):
    """SafeDumper that quotes every string :class:`_StrictLoader` would read as a number (``"1e3"``)."""


_YAML12_FLOAT = re.compile(r"^[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)$|^[-+]?\d+\.\d*$|^[-+]?\.\d+$")
for _cls in (_StrictLoader, _Dumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _YAML12_FLOAT, list("-+0123456789."))


def dump_yaml(data: Mapping[str, Any]) -> str:
    """YAML text that :func:`read_yaml` reads back to ``data``, keys in their order."""
    return yaml.dump(dict(data), Dumper=_Dumper, sort_keys=False)


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML config file as a dict (empty file: {}), read with :class:`_StrictLoader`."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} not found")
    try:
        with p.open(encoding="utf-8") as f:
            data = yaml.load(f, Loader=_StrictLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p} is not valid YAML: {exc}") from exc
    except RecursionError as exc:  # PyYAML composes nested nodes recursively
        raise ConfigError(f"{p} nests lists or mappings too deeply to read: a config is a few levels deep; give "
                          "a YAML config") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p} is not a text file ({exc.reason} at byte {exc.start}): give a YAML config") from exc
    except OSError as exc:
        raise ConfigError(f"config file {p} cannot be read: {exc.strerror}") from exc
    return {} if data is None else data


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain dict of a config dataclass (for config.yaml: trust-granting fields and the folded ``bits`` left out)."""
    out = dataclasses.asdict(cfg)
    if isinstance(cfg, RunConfig):
        for name in [*_trust_fields(), "bits"]:
            out.pop(name, None)
        out["calib"]["beta"] = list(out["calib"]["beta"])
    return out


def result_settings(cfg: RunConfig, device_kind: str | None = None) -> dict[str, Any]:
    """The resolved settings that can change a run's result, flat ("calib.iters": 2000), JSON-normalized.

    device_kind: the device type the run resolved ``device`` to (cpu, cuda, mps), recorded instead of what was
    typed, so that ``--device auto`` and ``--device cpu`` on a CPU machine are the same run, and ``auto`` on a
    GPU machine is not the same as on a CPU machine. The reconstruction engine is recorded resolved for that
    device too: what ``--engine auto`` picks may change between versions, and a run resumes with the engine
    its first units were calibrated by, or not at all.
    """
    flat: dict[str, Any] = {}
    for f in fields(cfg):
        if f.name in _SECTION_TYPES:
            flat.update({f"{f.name}.{g.name}": getattr(getattr(cfg, f.name), g.name)
                         for g in fields(getattr(cfg, f.name)) if g.metadata.get("result", True)})
        elif f.metadata.get("result", True):
            flat[f.name] = getattr(cfg, f.name)
    if device_kind is not None:
        flat["device"] = device_kind
        flat["calib.engine"] = cfg.calib.resolved_engine(device_kind)
    return json.loads(json.dumps(flat, sort_keys=True))


def result_defaults() -> dict[str, Any]:
    """result_settings' keys of the sections at what a run made before a setting existed used: its default, or
    its ``before`` value where the default changed the behaviour; resuming such a run is safe at that value."""
    flat = {f"{name}.{g.name}": g.metadata.get("before", getattr(section(), g.name))
            for name, section in _SECTION_TYPES.items() for g in fields(section) if g.metadata.get("result", True)}
    return json.loads(json.dumps(flat, sort_keys=True))


def fingerprint(settings: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def schema_fields(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    """(field, type hint) of a config dataclass, for generating flags."""
    hints = _hints(cls)
    return [(f, hints[f.name]) for f in fields(cls)]

