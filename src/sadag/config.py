"""Typed run configuration. The CLI, YAML files and the Python API all fill these dataclasses."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal

from .errors import ConfigError

Method = Literal["sadag", "genie", "zeroq", "noise", "real"]
Neighbor = Literal["random", "adversarial"]
METHODS: tuple[str, ...] = ("sadag", "genie", "zeroq", "noise", "real")
NEIGHBORS: tuple[str, ...] = ("random", "adversarial")
SAMPLINGS: tuple[str, ...] = ("epochs", "replacement")
ENGINES: tuple[str, ...] = ("auto", "eager", "compiled")


@dataclass
class QuantConfig:
    """What is quantized and how (ALGORITHM.md section 2)."""

    w_bits: int = 4
    a_bits: int | None = 4  # None = activations stay full precision
    first_last_8bit: bool = True  # first layer W8 (input FP), second layer's input A8, last layer W8A8
    fold_bn: bool = False  # fold BatchNorm into the preceding conv before quantizing (deployable)
    clip_search_p: float = 2.4  # exponent of the |w - Q(w)|^p clip-search error
    units: list[str] | None = None  # module names of the reconstruction units; None = detect

    def validate(self) -> None:
        if not isinstance(self.w_bits, int) or not 2 <= self.w_bits <= 8:
            raise ConfigError(f"weight bits must be an integer in 2..8, got {self.w_bits!r}")
        if self.a_bits is not None and (not isinstance(self.a_bits, int) or not 2 <= self.a_bits <= 8):
            raise ConfigError(
                f"activation bits must be an integer in 2..8 (or 'fp' for unquantized), got {self.a_bits!r}"
            )


@dataclass
class CalibConfig:
    """Block reconstruction (Genie-M / BRECQ / QDrop)."""

    iters: int = 20_000  # per reconstruction unit
    batch_size: int = 32
    lr_round: float = 1e-3  # AdaRound V
    lr_w_scale: float = 1e-4  # learned weight step size (Genie); 0 disables learning it
    lr_a_scale: float = 4e-5  # LSQ activation step size, cosine annealed
    round_weight: float = 1.0  # AdaRound regulariser weight
    warmup: float = 0.2  # fraction of iterations without the regulariser
    beta: tuple[float, float] = (20.0, 2.0)
    drop_prob: float = 0.5  # QDrop: probability of keeping the FP value, for input mix and quantizers
    anneal_w_scale: bool = True  # cosine-anneal the weight step size's lr too (Genie's reconstruct.py:82-88)
    sampling: str = "epochs"  # minibatches: "epochs" (permuted, without replacement, as Genie) or "replacement"
    engine: str = "auto"  # training step: "eager", "compiled" (torch.compile), "auto" (compiled on CUDA only)

    def validate(self) -> None:
        if self.iters < 0:
            raise ConfigError(f"calibration iterations must be >= 0, got {self.iters}")
        if self.batch_size < 1:
            raise ConfigError(f"calibration batch size must be >= 1, got {self.batch_size}")
        if not 0.0 <= self.drop_prob <= 1.0:
            raise ConfigError(f"drop_prob must be in [0, 1], got {self.drop_prob}")
        if not 0.0 <= self.warmup < 1.0:
            raise ConfigError(f"warmup must be in [0, 1), got {self.warmup}")
        if self.sampling not in SAMPLINGS:
            raise ConfigError(f"sampling must be one of {', '.join(SAMPLINGS)}, got {self.sampling!r}")
        if self.engine not in ENGINES:
            raise ConfigError(f"engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")


@dataclass
class GenConfig:
    """Synthetic calibration data (ALGORITHM.md sections 1 and 3)."""

    num_images: int = 1024
    batch_size: int = 128  # each batch has its own generator and latents
    latent_dim: int = 256
    genie_iters: int = 4000  # Genie-D iterations per batch
    lr_z: float = 0.1
    lr_g: float = 0.01
    g_decay: float = 0.95  # generator lr multiplier every g_decay_every iterations
    g_decay_every: int = 100
    plateau_patience: int = 100
    min_lr_z: float = 1e-4
    swing: bool = True
    parallel_batches: int = 0  # Genie-D/ZeroQ batches optimized in one pass; 0 = auto (CPU 1, GPU all that fit)
    # SADAG stages B and C
    warmup_calib_iters: int = 4000  # stage B: Genie-M iterations per unit of the warm-up quantized model
    refine_iters: int = 500  # stage C: refinement iterations per batch
    refine_lr_z: float = 1e-5
    refine_lr_g: float = 1e-4
    refine_min_lr_z: float = 1e-6
    refine_g_decay: float = 0.95  # every refinement iteration
    lambda_gm: float = 1.0
    lambda_div: float = 1.0
    rho: float = 1.0
    zeta: float = 0.0
    neighbor: Neighbor = "random"
    # ZeroQ baseline
    zeroq_iters: int = 500
    zeroq_lr: float = 0.5

    def validate(self) -> None:
        if self.num_images < 1 or self.batch_size < 1:
            raise ConfigError(f"num_images and batch_size must be >= 1, got {self.num_images}, {self.batch_size}")
        if self.neighbor not in NEIGHBORS:
            raise ConfigError(f"neighbor must be one of {', '.join(NEIGHBORS)}, got {self.neighbor!r}")
        for name in ("genie_iters", "refine_iters", "zeroq_iters", "warmup_calib_iters", "parallel_batches"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")


# Iteration budgets. "paper" is ALGORITHM.md; "fast" finishes ResNet-20 in minutes on 2 CPU cores;
# "smoke" takes seconds and exists for tests.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "paper": {"calib": {}, "gen": {}},
    "fast": {
        "calib": {"iters": 2000},
        "gen": {"num_images": 256, "genie_iters": 1000, "warmup_calib_iters": 500, "refine_iters": 200,
                "zeroq_iters": 500},
    },
    "smoke": {
        "calib": {"iters": 20, "batch_size": 16},
        "gen": {"num_images": 32, "batch_size": 16, "genie_iters": 10, "warmup_calib_iters": 5,
                "refine_iters": 5, "zeroq_iters": 10, "plateau_patience": 5},
    },
}


@dataclass
class RunConfig:
    """One `sadag run`: model, data, method, bits, budgets, output."""

    model: str = "resnet20_cifar10"
    weights: str | None = None  # checkpoint path; None = the model's default download location
    method: Method = "sadag"
    bits: str = "4/4"  # "W/A", A may be "fp"
    preset: str = "paper"
    calib_data: str | None = None  # image folder (method real) or a saved synthetic set
    num_calib: int | None = None  # real images to sample; defaults to gen.num_images
    eval_data: str | None = None
    class_index: str | None = None  # file of class names (e.g. wnids.txt) mapping folders to labels
    eval_batch_size: int = 256
    eval_limit: int | None = None  # evaluate on at most this many images
    out: str | None = None
    seed: int = 0
    device: str = "auto"
    # Explicit sub-config values that win over the preset, e.g. {"calib": {"iters": 500}}.
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    quant: QuantConfig = field(default_factory=QuantConfig)
    calib: CalibConfig = field(default_factory=CalibConfig)
    gen: GenConfig = field(default_factory=GenConfig)

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.preset not in PRESETS:
            raise ConfigError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        self.quant.validate()
        self.calib.validate()
        self.gen.validate()


def parse_bits(bits: str) -> tuple[int, int | None]:
    """Parse "W/A" such as "4/4", "2/4" or "4/fp"."""
    parts = str(bits).lower().replace("w", "").replace("a", "/").split("/")
    parts = [p for p in parts if p]
    if len(parts) != 2:
        raise ConfigError(f"bits must look like W/A, e.g. 4/4, 2/4 or 4/fp; got {bits!r}")
    try:
        w = int(parts[0])
        a = None if parts[1] == "fp" else int(parts[1])
    except ValueError as exc:
        raise ConfigError(f"bits must look like W/A with integers 2..8 or 'fp', got {bits!r}") from exc
    QuantConfig(w_bits=w, a_bits=a).validate()
    return w, a


_SUBCONFIGS: dict[str, type] = {"quant": QuantConfig, "calib": CalibConfig, "gen": GenConfig}


def _check_overrides(overrides: dict[str, dict[str, Any]]) -> None:
    for section, values in overrides.items():
        if section not in _SUBCONFIGS:
            raise ConfigError(f"unknown config section {section!r}; valid: {', '.join(_SUBCONFIGS)}")
        valid = {f.name for f in fields(_SUBCONFIGS[section])}
        unknown = set(values) - valid
        if unknown:
            raise ConfigError(
                f"unknown {section} options: {', '.join(sorted(unknown))}; valid: {', '.join(sorted(valid))}"
            )


def apply_preset(cfg: RunConfig) -> RunConfig:
    """Return a copy with the preset's budgets applied, then ``cfg.overrides`` on top (idempotent)."""
    cfg.validate()
    _check_overrides(cfg.overrides)
    preset, overrides = PRESETS[cfg.preset], cfg.overrides
    calib = replace(cfg.calib, **{**preset["calib"], **overrides.get("calib", {})})
    gen = replace(cfg.gen, **{**preset["gen"], **overrides.get("gen", {})})
    w, a = parse_bits(cfg.bits)
    quant = replace(cfg.quant, **{**overrides.get("quant", {}), "w_bits": w, "a_bits": a})
    out = replace(cfg, calib=calib, gen=gen, quant=quant)
    out.validate()
    return out


def to_dict(cfg: Any) -> dict[str, Any]:
    return asdict(cfg)


def _from_dict(cls: type, data: dict[str, Any]) -> Any:
    known = {f.name: f for f in fields(cls)}
    unknown = set(data) - set(known)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} keys: {', '.join(sorted(unknown))}; valid: {', '.join(known)}")
    return cls(**data)


def run_config_from_dict(data: dict[str, Any]) -> RunConfig:
    """A RunConfig from a YAML/JSON dict; its quant/calib/gen sections become overrides of the preset."""
    data = dict(data)
    overrides = {k: dict(v) for k, v in (data.pop("overrides", None) or {}).items()}
    for section in _SUBCONFIGS:
        values = data.pop(section, None) or {}
        if "beta" in values:
            values["beta"] = tuple(values["beta"])
        overrides[section] = {**values, **overrides.get(section, {})}
    _check_overrides(overrides)
    return _from_dict(RunConfig, {**data, "overrides": {k: v for k, v in overrides.items() if v}})
