"""A TorchServe handler for a cbam-serve checkpoint, archived by torch-model-archiver at run time.

Packed by `cbam-bench --peers` into a .mar with our `models` package and the checkpoint (the serialized
file); runs in TorchServe's Python workers, not imported by the project. The model gets what cbam-serve's
eager runner gives it: eval mode, channels-last memory, torch.inference_mode. Each request's "data" is one
uint8 H x W x 3 image; each answer is the JSON of its top-1 class and probability, the same work cbam-serve
does for top_k=1.
"""

import json
import os

import numpy as np
import torch

from models import load_checkpoint

_served = {}


def handle(data, context):
    """TorchServe's module-level entry point: None at load (initialise), else one answer per request."""
    if not _served:
        properties = context.system_properties
        checkpoint = os.path.join(properties["model_dir"], context.manifest["model"]["serializedFile"])
        model, meta = load_checkpoint(checkpoint)
        _served.update(
            model=model.to(memory_format=torch.channels_last),
            shape=(*meta.input_size, 3),
            mean=torch.tensor(meta.mean).view(1, 3, 1, 1),
            std=torch.tensor(meta.std).view(1, 3, 1, 1),
        )
    if data is None:
        return None
    images = np.stack([np.frombuffer(row.get("data") or row.get("body"), np.uint8) for row in data])
    with torch.inference_mode():
        x = torch.from_numpy(images.reshape(-1, *_served["shape"])).permute(0, 3, 1, 2).float().div_(255.0)
        x = ((x - _served["mean"]) / _served["std"]).contiguous(memory_format=torch.channels_last)
        probability, index = _served["model"](x).softmax(dim=1).max(dim=1)
    return [
        json.dumps({"index": i, "probability": p})
        for i, p in zip(index.tolist(), probability.tolist(), strict=True)
    ]
