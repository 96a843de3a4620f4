"""CBAM-ResNet image classifiers: the model zoo, its registry, checkpoints and the default model."""

from . import resnet as _resnet  # noqa: F401  (registers the builders)
from ._default import DEFAULT_CHECKPOINT, SAMPLES_DIR
from .checkpoint import CheckpointError, CheckpointMetadata, load_checkpoint, save_checkpoint
from .registry import create_model, list_models, register_model

__all__ = [
    "create_model",
    "list_models",
    "register_model",
    "load_checkpoint",
    "save_checkpoint",
    "CheckpointMetadata",
    "CheckpointError",
    "DEFAULT_CHECKPOINT",
    "SAMPLES_DIR",
]
