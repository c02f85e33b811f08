"""Model registry and the LVM architecture (timm style: named variants, no implicit weights).

>>> from encoder.models import create_model, list_models
>>> model = create_model("lvm_tiny")          # architecture only; weights: encoder.checkpoint
"""

from encoder.models._registry import UnknownModelError, create_model, list_models, register_model
from encoder.models.lvm import (
    LVM,
    N_INPUT_STATS,
    InputSizeError,
    LVMBackbone,
    LVMConfig,
    LVMDecoder,
    describe,
    input_statistics,
)

__all__ = [
    "LVM",
    "N_INPUT_STATS",
    "InputSizeError",
    "LVMBackbone",
    "LVMConfig",
    "LVMDecoder",
    "UnknownModelError",
    "create_model",
    "describe",
    "input_statistics",
    "list_models",
    "register_model",
]
