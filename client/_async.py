"""The asyncio client: the same calls as Client, awaited."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Sequence

import grpc
from grpc_health.v1 import health_pb2

from cbam.v1 import inference_pb2

from ._base import BatchCall, ClientBase, RequestOptions, remaining
from ._errors import CbamError, UnavailableError, error_from_rpc
from ._images import ImageInput
from ._messages import AttentionArg, FormatArg, to_model_info, to_prediction
from ._stream import StreamRun
from ._types import ModelInfo, Prediction, StreamResult

__all__ = ["AsyncClient"]

# grpc.aio reports this instead of the server's status when a request write fails because the server
# has just ended the stream (grpc/grpc#36066). The status it hides is most often the UNAVAILABLE of a
# server going away, so a stream is resumed on it, within the same bounded retries.
_CORE_WRITE_RACE = "Internal error from Core"
_END, _NOTHING = object(), object()  # a spent source; no image held


class AsyncClient(ClientBase):
    """An asyncio client of cbam-serve; takes the same arguments as Client.

        async with AsyncClient("localhost:50051") as client:
            prediction = await client.classify("cat.png", top_k=3)

    Create it inside the event loop that will use it.
    """

    @staticmethod
    def _open_channel(target: str, options: list, credentials: grpc.ChannelCredentials | None):
        if credentials is None:
            return grpc.aio.insecure_channel(target, options=options)
        return grpc.aio.secure_channel(target, credentials, options=options)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the connections; calls in flight are cancelled."""
        for channel in self._channels:
            await channel.close()

    async def classify(
        self,
        image: ImageInput,
        *,
        top_k: int = 0,
        attention: AttentionArg | None = None,
        attention_blocks: Sequence[str] | None = None,
        attention_format: FormatArg = "float16",
        request_id: str = "",
        timeout: float | None = None,
    ) -> Prediction:
        """Classify one image; see Client.classify."""
        options = RequestOptions(top_k, attention, attention_blocks, attention_format)
        if isinstance(image, (str, os.PathLike)):
            request = await asyncio.to_thread(options.build, image, request_id)  # file reads off the loop
        else:
            request = options.build(image, request_id)
        return to_prediction(await self._unary(self._stub.Classify, request, timeout))

    async def classify_stream(
        self,
        images: Iterable[ImageInput] | AsyncIterable[ImageInput],
        *,
        top_k: int = 0,
        attention: AttentionArg | None = None,
        attention_blocks: Sequence[str] | None = None,
        attention_format: FormatArg = "float16",
        max_inflight: int = 32,
        timeout: float | None = None,
    ) -> AsyncIterator[StreamResult]:
        """Classify many images over one stream, yielding results as they finish; see Client.classify_stream.

        `images` may be an iterable or an async iterable; either is read lazily, one image per free slot
        of the `max_inflight` window, so an endless async generator works in constant memory.
        """
        run = StreamRun(
            RequestOptions(top_k, attention, attention_blocks, attention_format),
            max_inflight=max_inflight,
            deadline=self._deadline(timeout, None),
            retry_delay=self._retry_delay,
        )
        source = _Inputs(images)
        try:
            while True:
                window = asyncio.Semaphore(max_inflight)
                closed = asyncio.Event()
                requests = self._requests(run, source, window, closed)
                metadata = self._call_metadata()
                call = self._stub.ClassifyStream(requests, timeout=run.timeout(), metadata=metadata)
                try:
                    async for response in call:
                        results, freed = run.answer(response)
                        if freed:
                            window.release()
                        for result in results:
                            yield result
                    closed.set()
                    for result in run.finish():
                        yield result
                    if run.source_error is not None:
                        raise run.source_error
                    return
                except grpc.RpcError as exc:
                    error = error_from_rpc(exc)
                finally:
                    closed.set()
                    call.cancel()
                failures, delay = run.interrupted(_unmasked(error))
                for failure in failures:
                    yield failure
                if delay is None:
                    raise error
                await asyncio.sleep(delay)
        finally:
            source.close()

    async def classify_many(
        self,
        images: Iterable[ImageInput] | AsyncIterable[ImageInput],
        *,
        return_exceptions: bool = False,
        **kwargs,
    ) -> list[Prediction | CbamError]:
        """Classify many images over one stream, predictions in input order; see Client.classify_many."""
        results: dict[int, Prediction | CbamError] = {}
        stream = self.classify_stream(images, **kwargs)
        try:
            async for result in stream:
                if result.error is not None and not return_exceptions:
                    raise result.error
                results[result.index] = result.prediction if result.error is None else result.error
        finally:
            await stream.aclose()
        return [results[index] for index in sorted(results)]

    async def classify_batch(
        self,
        images: Sequence[ImageInput],
        *,
        top_k: int = 0,
        attention: AttentionArg | None = None,
        attention_blocks: Sequence[str] | None = None,
        attention_format: FormatArg = "float16",
        return_exceptions: bool = False,
        timeout: float | None = None,
    ) -> list[Prediction | CbamError]:
        """Classify several images in one ClassifyBatch call; see Client.classify_batch."""
        options = RequestOptions(top_k, attention, attention_blocks, attention_format)
        images = list(images)
        if any(isinstance(image, (str, os.PathLike)) for image in images):
            call = await asyncio.to_thread(BatchCall, options, images)  # file reads off the loop
        else:
            call = BatchCall(options, images)
        response = await self._unary(self._stub.ClassifyBatch, call.request, timeout) if call.sent else None
        return call.results(response, return_exceptions)

    async def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        """What the server is serving; see Client.model_info."""
        request = inference_pb2.GetModelInfoRequest()
        return to_model_info(await self._unary(self._stub.GetModelInfo, request, timeout))

    async def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """The serving status of `service` ("" is the whole server): "SERVING", "NOT_SERVING", ..."""
        request = health_pb2.HealthCheckRequest(service=service)
        response = await self._unary(self._health.Check, request, timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    async def _unary(self, method, request, timeout: float | None):
        deadline = self._deadline(timeout, self.timeout)
        attempt = 1
        while True:
            try:
                return await method(request, timeout=remaining(deadline), metadata=self._call_metadata())
            except grpc.RpcError as exc:
                error = error_from_rpc(exc)
                delay = self._retry_delay(error, attempt, deadline)
                if delay is None:
                    raise error from None
            await asyncio.sleep(delay)
            attempt += 1

    @staticmethod
    async def _requests(run: StreamRun, source: _Inputs, window: asyncio.Semaphore, closed: asyncio.Event):
        while not closed.is_set():
            await window.acquire()
            if closed.is_set():
                return
            request = run.resend()
            while request is None and run.source_error is None:
                try:
                    image = await source.peek()
                except Exception as exc:
                    run.source_failed(exc)
                    return
                if closed.is_set():  # the stream broke while we waited: the image is kept for the next
                    return
                if image is _END:
                    return
                request = run.admit(source.take())
            if request is None:
                return
            yield request


class _Inputs:
    """The images of one classify_stream, a plain or an async iterable, read one at a time.

    The read of an async source is shielded: a stream broken while it waits neither loses that image
    (the next stream takes it) nor throws into the caller's generator.
    """

    def __init__(self, images: Iterable[ImageInput] | AsyncIterable[ImageInput]) -> None:
        self._async = isinstance(images, AsyncIterable)
        self._iterator = aiter(images) if self._async else iter(images)
        self._held = _NOTHING
        self._reading: asyncio.Future | None = None

    async def peek(self) -> ImageInput:
        """The next image (_END when there are no more), without taking it."""
        if self._held is _NOTHING:
            if not self._async:
                self._held = next(self._iterator, _END)
            else:
                if self._reading is None:
                    self._reading = asyncio.ensure_future(anext(self._iterator, _END))
                self._held = await asyncio.shield(self._reading)
                self._reading = None
        return self._held

    def take(self) -> ImageInput:
        image, self._held = self._held, _NOTHING
        return image

    def close(self) -> None:
        if self._reading is not None:
            self._reading.cancel()


def _unmasked(error: CbamError) -> CbamError:
    if error.code == grpc.StatusCode.INTERNAL and error.message == _CORE_WRITE_RACE:
        return UnavailableError(grpc.StatusCode.UNAVAILABLE, f"{error.message} (grpc/grpc#36066)")
    return error
