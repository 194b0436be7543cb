"""Synthetic calibration data: Genie-D, SADAG refinement, ZeroQ and noise baselines."""

from ..methods import GenerationMethod, get_method, method_names, register_method
from . import builtin  # noqa: F401 (registers noise, zeroq, genie, sadag)
from .bn_stats import bn_layers, bn_statistics_loss, capture_bn_inputs, input_prior_loss
from .common import DevicePlateau, Progress
from .context import GenerationContext
from .duplicates import near_copy_mask, near_duplicates
from .generator import GenieGenerator
from .genie import GenieBatch, batch_sizes, generate_genie
from .io import images_digest, load_synthetic_set, save_synthetic_set
from .noise import generate_noise
from .sadag import RefineCheckpoints, diversity_loss, gradient_cosine, gradient_matching_loss, refine_sadag
from .swing import SwingConv2d, swing_model, swing_shift
from .zeroq import generate_zeroq

__all__ = [
    "DevicePlateau",
    "GenerationContext",
    "GenerationMethod",
    "GenieBatch",
    "GenieGenerator",
    "Progress",
    "RefineCheckpoints",
    "SwingConv2d",
    "batch_sizes",
    "bn_layers",
    "bn_statistics_loss",
    "capture_bn_inputs",
    "diversity_loss",
    "generate_genie",
    "generate_noise",
    "generate_zeroq",
    "get_method",
    "gradient_cosine",
    "gradient_matching_loss",
    "images_digest",
    "input_prior_loss",
    "load_synthetic_set",
    "method_names",
    "near_copy_mask",
    "near_duplicates",
    "refine_sadag",
    "register_method",
    "save_synthetic_set",
    "swing_model",
    "swing_shift",
]
