"""A typed Python client of cbam-serve, blocking (Client) and asyncio (AsyncClient).

    from client import Client
    with Client("localhost:50051") as c:
        p = c.classify("cat.png", top_k=3, attention="spatial")
        p.labels       # [LabelScore(index, name, probability), ...]
        p.attention    # {"layer1.0": {"spatial": np.ndarray (H, W)}, ...}
    attention_figure(p, "cat.png").savefig("cat-attention.png")   # needs matplotlib (the load extra)
"""

from ._async import AsyncClient
from ._channel import TlsConfig, build_target
from ._errors import (
    AuthenticationError,
    CbamError,
    DeadlineExceededError,
    InvalidArgumentError,
    OverloadedError,
    UnavailableError,
)
from ._figures import attention_figure
from ._images import ImageInput
from ._retry import RetryPolicy
from ._sync import Client
from ._types import BatchingInfo, LabelScore, ModelInfo, Prediction, StreamResult, Timings, WorkerInfo

__all__ = [
    "AsyncClient",
    "AuthenticationError",
    "BatchingInfo",
    "CbamError",
    "Client",
    "DeadlineExceededError",
    "ImageInput",
    "InvalidArgumentError",
    "LabelScore",
    "ModelInfo",
    "OverloadedError",
    "Prediction",
    "RetryPolicy",
    "StreamResult",
    "Timings",
    "TlsConfig",
    "UnavailableError",
    "WorkerInfo",
    "attention_figure",
    "build_target",
]
