"""sadag: data-free low-bit quantization of image classifiers (Genie-D + SADAG data, block reconstruction)."""

__version__ = "0.1.0"

from .config import CalibConfig, GenConfig, QuantConfig, RunConfig, apply_preset, load_config  # noqa: E402
from .errors import SadagError  # noqa: E402
from .evaluation import evaluate  # noqa: E402
from .models import DataSpec, list_models, load_model  # noqa: E402
from .pipeline import calibrate, generate_set, run, synthesize  # noqa: E402
from .quantization.prepare import quantize  # noqa: E402
from .reconstruction.reconstruct import reconstruct_  # noqa: E402

__all__ = [
    "CalibConfig",
    "DataSpec",
    "GenConfig",
    "QuantConfig",
    "RunConfig",
    "SadagError",
    "apply_preset",
    "calibrate",
    "evaluate",
    "generate_set",
    "list_models",
    "load_config",
    "load_model",
    "quantize",
    "reconstruct_",
    "run",
    "synthesize",
]
