"""Where the embedded default model (CBAM-ResNet-8 on handwritten digits) and its samples live."""

from pathlib import Path

_DIR = Path(__file__).resolve().parent / "default"

DEFAULT_CHECKPOINT = _DIR / "cbam_digits.safetensors"
SAMPLES_DIR = _DIR / "samples"
