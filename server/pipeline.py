"""One request's way through the server: decode -> batch -> predict -> unbatch -> encode.

    classify(query)
      check          top_k and block names, queue room              (before any work)
      preprocess     decode, validate, resize, normalise             thread pool, stage="preprocess"
      batcher        bounded queue -> batch within max_batch_delay   stage="queue", cbam_batch_size
      runner         one forward per batch, maps if any asked,       inference thread, stage="inference"
                     then every row's top-k in one softmax/topk
      postprocess    only the maps this request asked for            stage="postprocess"

    classify_many(queries) does the same for the images of one ClassifyBatch call: checks and
    preprocessing per image (a bad one fails alone), queued together, answered in order.

Plain Python types in and out; gRPC is service.py's business. With tracing on, each stage's timing
also becomes a span (or event) of the current request (server/tracing.py).
"""

from __future__ import annotations

import asyncio
import ctypes
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from server.batcher import Batched, DynamicBatcher
from server.config import Settings, usable_cores
from server.errors import CbamError, InvalidInput
from server.metrics import ServerMetrics
from server.postprocess import AttentionQuery, EncodedMap, LabelScore, encode_attention, top_k_rows
from server.preprocess import ImageSpec, RawTensor, is_ready_pixels, load_pixels
from server.runner import BatchItem, ItemOutput, ModelDescription, ModelRunner, warm_up_sizes
from server.tracing import Tracing

__all__ = ["DEFAULT_TOP_K", "INFERENCE_THREAD", "InferencePipeline", "Prediction", "Query", "Timings"]

DEFAULT_TOP_K = 5
# The operating-system name of the thread that runs the forward passes. Threads it starts inherit it
# (torch's OpenMP workers), so `top -H` and cbam-bench tell the forward's CPU time from the rest's.
INFERENCE_THREAD = "cbam-inference"

# What the batcher carries: an image with the number of labels its caller wants; and what it hands
# back: those labels (computed for the whole batch at once) with the image's output.
_Work = tuple[BatchItem, int]
_Done = tuple[list[LabelScore], ItemOutput]


@dataclass(frozen=True)
class Query:
    """One image to classify. ``top_k`` 0 means the default."""

    request_id: str
    image: bytes | RawTensor
    top_k: int = 0
    attention: AttentionQuery = field(default_factory=AttentionQuery)


@dataclass(frozen=True)
class Timings:
    preprocess_seconds: float
    queue_seconds: float
    inference_seconds: float
    postprocess_seconds: float
    batch_size: int


@dataclass(frozen=True)
class Prediction:
    request_id: str
    labels: list[LabelScore]
    attention: list[EncodedMap]
    model_version: str
    timings: Timings


class InferencePipeline:
    """Classifies queries with ``runner``, batching concurrent ones. ``start()`` it on the event loop."""

    def __init__(
        self, runner: ModelRunner, settings: Settings, metrics: ServerMetrics, tracing: Tracing = Tracing.OFF
    ) -> None:
        self.description: ModelDescription = runner.description
        self._runner = runner
        self._metrics = metrics
        self._tracing = tracing
        self._preprocess_stage = metrics.stage_seconds.labels("preprocess")
        self._postprocess_stage = metrics.stage_seconds.labels("postprocess")
        self._max_batch_size = settings.batching.max_batch_size
        d = runner.description
        self._spec = ImageSpec(d.input_size, d.mean, d.std, settings.limits.max_image_pixels)
        self._blocks = frozenset(d.attention_blocks)
        # Preprocessing gets a few threads, inference one: the forward already uses every core
        # (torch intra-op threads), and a second forward would only fight the first for them.
        self.preprocess_threads = settings.preprocess_threads or max(1, usable_cores() // 2)
        self._preprocess_pool = ThreadPoolExecutor(
            self.preprocess_threads, "preprocess", initializer=_name_os_thread, initargs=("cbam-preprocess",)
        )
        self._inference_pool = ThreadPoolExecutor(
            1, "inference", initializer=_name_os_thread, initargs=(INFERENCE_THREAD,)
        )
        self.batcher: DynamicBatcher[_Work, _Done] = DynamicBatcher(
            self._run_batch,
            max_batch_size=settings.batching.max_batch_size,
            max_batch_delay_s=settings.batching.max_batch_delay_ms / 1000.0,
            max_queue=settings.batching.max_queue,
            metrics=metrics,
            tracing=tracing,
        )

    def start(self) -> None:
        self.batcher.start()

    async def warm_up(self) -> None:
        """Run every batch size the batcher can form once, in the inference thread."""
        sizes = warm_up_sizes(self._max_batch_size)
        await asyncio.get_running_loop().run_in_executor(self._inference_pool, self._runner.warm_up, sizes)

    async def close(self) -> None:
        """Finish what is queued, then release the threads."""
        await self.batcher.close()
        self._preprocess_pool.shutdown(wait=True, cancel_futures=True)
        self._inference_pool.shutdown(wait=True)

    async def classify(self, query: Query, deadline: float | None = None) -> Prediction:
        """Classify one image. ``deadline`` is a time.monotonic() value. Raises CbamError subclasses."""
        k = self._top_k(query.top_k)
        blocks = self._blocks_for(query.attention)
        self.batcher.check_room()  # refuse now rather than after decoding an image we cannot queue
        started = time.monotonic()
        try:
            with self._preprocess_stage.time():
                if is_ready_pixels(query.image, self._spec):
                    # Already decoded and sized: a check and a copy, cheaper than a trip to a thread.
                    tensor = load_pixels(query.image, self._spec)
                else:
                    tensor = await asyncio.get_running_loop().run_in_executor(
                        self._preprocess_pool, load_pixels, query.image, self._spec
                    )
        finally:  # timed whether the image was good or not, as the stage metric is
            preprocess_seconds = time.monotonic() - started
            if self._tracing.enabled:
                self._tracing.stage("preprocess", started, started + preprocess_seconds)
        batched = await self.batcher.submit((BatchItem(tensor, blocks), k), deadline)
        return await self._finish(query, batched, preprocess_seconds)

    async def classify_many(
        self, queries: Sequence[Query], deadline: float | None = None
    ) -> list[Prediction | CbamError]:
        """Classify several images, queued together: all of them, or (Overloaded, raised) none.

        Each image is batched as if it came alone. What fails one image (a bad image, top_k or block
        name; its deadline passing in the queue) comes back in its place; the others are unaffected.
        ``preprocess_seconds`` in each prediction is the whole call's preprocessing."""
        self.batcher.check_room(len(queries))
        outcomes: list[Prediction | CbamError | None] = [None] * len(queries)
        work: list[tuple[int, _Work]] = []
        to_decode: list[tuple[int, frozenset[str] | None, int]] = []
        started = time.monotonic()
        with self._preprocess_stage.time():
            for i, query in enumerate(queries):
                try:
                    k = self._top_k(query.top_k)
                    blocks = self._blocks_for(query.attention)
                    if is_ready_pixels(query.image, self._spec):
                        work.append((i, (BatchItem(load_pixels(query.image, self._spec), blocks), k)))
                    else:
                        to_decode.append((i, blocks, k))
                except CbamError as exc:
                    outcomes[i] = exc
            if to_decode:
                loop = asyncio.get_running_loop()
                decoded = await asyncio.gather(
                    *(
                        loop.run_in_executor(self._preprocess_pool, load_pixels, queries[i].image, self._spec)
                        for i, _, _ in to_decode
                    ),
                    return_exceptions=True,
                )
                for (i, blocks, k), tensor in zip(to_decode, decoded, strict=True):
                    if isinstance(tensor, CbamError):
                        outcomes[i] = tensor
                    elif isinstance(tensor, BaseException):
                        raise tensor
                    else:
                        work.append((i, (BatchItem(tensor, blocks), k)))
                work.sort(key=lambda pair: pair[0])
        preprocess_seconds = time.monotonic() - started
        if self._tracing.enabled:
            self._tracing.stage("preprocess", started, started + preprocess_seconds)

        futures = self.batcher.submit_many([item for _, item in work], deadline)
        try:
            # In order, one at a time: a future already done costs no suspension, and no gather().
            for (i, _), future in zip(work, futures, strict=True):
                try:
                    batched = await future
                except Exception as exc:  # Expired in the queue, or its batch failed
                    outcomes[i] = exc  # type: ignore[assignment]
                    continue
                if queries[i].attention.wanted:
                    outcomes[i] = await self._finish(queries[i], batched, preprocess_seconds)
                else:
                    outcomes[i] = self._prediction(queries[i], batched, preprocess_seconds, [], 0.0)
        except asyncio.CancelledError:  # the call went away: drop what it still has queued
            for future in futures:
                future.cancel()
            raise
        return outcomes  # type: ignore[return-value]  # every place is filled

    async def _finish(self, query: Query, batched: Batched[_Done], preprocess_seconds: float) -> Prediction:
        """The prediction, with the maps the query asked for encoded (in a thread: PNG costs)."""
        started = time.monotonic()
        with self._postprocess_stage.time():
            if query.attention.wanted:
                maps = await asyncio.get_running_loop().run_in_executor(
                    self._preprocess_pool, encode_attention, batched.value[1].maps, query.attention
                )
            else:
                maps = []
        postprocess_seconds = time.monotonic() - started
        if self._tracing.enabled:
            self._tracing.stage("postprocess", started, started + postprocess_seconds)
        return self._prediction(query, batched, preprocess_seconds, maps, postprocess_seconds)

    def _prediction(
        self,
        query: Query,
        batched: Batched[_Done],
        preprocess_seconds: float,
        maps: list[EncodedMap],
        postprocess_seconds: float,
    ) -> Prediction:
        return Prediction(
            request_id=query.request_id,
            labels=batched.value[0],
            attention=maps,
            model_version=self.description.version,
            timings=Timings(
                preprocess_seconds=preprocess_seconds,
                queue_seconds=batched.queue_seconds,
                inference_seconds=batched.inference_seconds,
                postprocess_seconds=postprocess_seconds,
                batch_size=batched.batch_size,
            ),
        )

    async def _run_batch(self, work: list[_Work]) -> list[_Done]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._inference_pool, self._predict, work)

    def _predict(self, work: list[_Work]) -> list[_Done]:
        """In the inference thread: the forward, then every row's labels in one go (not per request
        on the event loop, where two small torch calls per request cost as much as the rest)."""
        outputs = self._runner.run_batch([item for item, _ in work])
        logits = torch.stack([output.logits for output in outputs])
        labels = top_k_rows(logits, self.description.labels, [k for _, k in work])
        return list(zip(labels, outputs, strict=True))

    def _top_k(self, requested: int) -> int:
        classes = len(self.description.labels)
        if requested == 0:
            return min(DEFAULT_TOP_K, classes)
        if requested > classes:
            raise InvalidInput(f"top_k: {requested} is more than the model's {classes} classes")
        return requested

    def _blocks_for(self, attention: AttentionQuery) -> frozenset[str] | None:
        unknown = sorted(set(attention.blocks) - self._blocks)
        if unknown:
            raise InvalidInput(
                f"attention.blocks: unknown block names {unknown}; this model's blocks are "
                f"{list(self.description.attention_blocks)}"
            )
        if not attention.wanted:
            return None
        return frozenset(attention.blocks) if attention.blocks else self._blocks


def _name_os_thread(name: str) -> None:
    """Name the calling thread for the operating system (Linux; elsewhere nothing happens)."""
    try:
        prctl = ctypes.CDLL("libc.so.6").prctl
    except (OSError, AttributeError):
        return
    pr_set_name = 15  # <linux/prctl.h>; the kernel keeps 15 bytes
    prctl(pr_set_name, name.encode()[:15], 0, 0, 0)
