"""Serve a cbam-serve checkpoint with PyTriton: Triton Inference Server in front of this process's model.

Run by `cbam-bench --peers` in the PyTriton venv, with our `models` package on PYTHONPATH; not imported by
the project. The model gets what cbam-serve's eager runner gives it: eval mode, channels-last memory,
torch.inference_mode. One request is one uint8 H x W x 3 image ("image"); the answer is its top-1 class
("index", INT64) and probability ("probability", FP32), the same work cbam-serve does for top_k=1.

    python pytriton_server.py CHECKPOINT --grpc-port P --http-port P --metrics-port P
        [--max-batch-size 8] [--max-queue-delay-ms 10]
"""

import argparse
import functools
import signal

import numpy as np
import pytriton.models.model
import torch
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

from models import load_checkpoint

MODEL_NAME = "cbam_resnet50"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--metrics-port", type=int, required=True)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--max-queue-delay-ms", type=float, default=10.0)
    args = parser.parse_args()

    model, meta = load_checkpoint(args.checkpoint)
    model = model.to(memory_format=torch.channels_last)
    height, width = meta.input_size
    mean = torch.tensor(meta.mean).view(1, 3, 1, 1)
    std = torch.tensor(meta.std).view(1, 3, 1, 1)

    @batch
    def infer(image: np.ndarray) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            x = torch.from_numpy(image).permute(0, 3, 1, 2).float().div_(255.0)
            x = ((x - mean) / std).contiguous(memory_format=torch.channels_last)
            probability, index = model(x).softmax(dim=1).max(dim=1)
        return {"index": index.numpy()[:, None], "probability": probability.numpy()[:, None]}

    config = TritonConfig(
        grpc_address="127.0.0.1",
        grpc_port=args.grpc_port,
        http_address="127.0.0.1",
        http_port=args.http_port,
        metrics_port=args.metrics_port,
    )
    batching = ModelConfig(
        max_batch_size=args.max_batch_size,
        batcher=DynamicBatcher(max_queue_delay_microseconds=round(args.max_queue_delay_ms * 1000)),
    )
    # PyTriton 0.7 gives its proxy process 1 s to answer the model's handshake; on a busy 2-core machine
    # it took longer and the bind failed after the model had loaded. A timeout, not a change of behaviour.
    pytriton.models.model.get_config_from_handshake_server = functools.partial(
        pytriton.models.model.get_config_from_handshake_server, timeout_s=60.0
    )
    # SIGTERM stops Triton and the proxy the way Ctrl-C does, so no tritonserver outlives this process.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with Triton(config=config) as triton:
        triton.bind(
            model_name=MODEL_NAME,
            infer_func=infer,
            inputs=[Tensor(name="image", dtype=np.uint8, shape=(height, width, 3))],
            outputs=[
                Tensor(name="index", dtype=np.int64, shape=(1,)),
                Tensor(name="probability", dtype=np.float32, shape=(1,)),
            ],
            config=batching,
            strict=True,
        )
        triton.serve()


if __name__ == "__main__":
    main()
