"""Bearer-token authentication of cbam.v1.InferenceService (settings group `auth`).

Tokens come from CBAM_AUTH__TOKENS (a comma list, or a JSON list), --auth.tokens, and/or a file
(auth.tokens_file, one token a line). A missing or wrong token gets UNAUTHENTICATED with one message
that does not say which; health checks and reflection stay open for probes and tools.
"""

from __future__ import annotations

import asyncio
import hmac
import json

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from pydantic import ValidationError

import server.auth
from cbam.v1 import inference_pb2 as pb
from cbam.v1 import inference_pb2_grpc
from server.auth import BearerTokenInterceptor
from server.config import load_settings
from server.launcher import ServerProcess, run_to_exit
from tests.reliability.corpus import encode, picture

TOKENS = ("alpha-7f3e2a", "bravo-91c4d0")
IMAGE = encode(picture(20, 20))


def _tokens(settings) -> list[str]:
    return [t.get_secret_value() for t in settings.auth.tokens]


# -- where tokens come from ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, expected",
    [
        ("alpha,bravo", ["alpha", "bravo"]),
        (" alpha , bravo ,", ["alpha", "bravo"]),
        ("alpha", ["alpha"]),
        ('["alpha", "bravo"]', ["alpha", "bravo"]),
        ("", []),
    ],
)
def test_tokens_from_the_environment(env, value, expected):
    env.set("CBAM_AUTH__TOKENS", value)
    assert _tokens(load_settings([])) == expected


def test_tokens_from_a_file_and_the_environment_together(env, tmp_path):
    path = tmp_path / "tokens"
    path.write_text("# one token a line\n\n  charlie  \ndelta\n")
    path.chmod(0o600)
    env.set("CBAM_AUTH__TOKENS", "alpha")
    settings = load_settings(["--auth.tokens_file", str(path)])
    assert sorted(_tokens(settings)) == ["alpha", "charlie", "delta"]


def test_a_tokens_file_without_tokens_is_an_error_not_authentication_off(env, tmp_path):
    path = tmp_path / "tokens"
    path.write_text("# all commented out\n\n")
    with pytest.raises(ValidationError, match="auth.tokens_file|tokens_file"):
        load_settings(["--auth.tokens_file", str(path)])


def test_a_missing_tokens_file_is_an_error(env, tmp_path):
    with pytest.raises(ValidationError, match="tokens_file"):
        load_settings(["--auth.tokens_file", str(tmp_path / "absent")])


def test_a_token_with_whitespace_inside_is_refused(env):
    env.set("CBAM_AUTH__TOKENS", '["two words"]')
    with pytest.raises(ValidationError, match="auth.tokens"):
        load_settings([])


def test_tokens_never_show_in_settings_reprs(env):
    env.set("CBAM_AUTH__TOKENS", ",".join(TOKENS))
    settings = load_settings([])
    for text in (repr(settings), str(settings), settings.model_dump_json()):
        assert not any(token in text for token in TOKENS)


# -- the interceptor ------------------------------------------------------------------------------------


class _Details:
    def __init__(self, method: str, metadata) -> None:
        self.method = method
        self.invocation_metadata = metadata


def test_every_token_is_compared_in_constant_time_whatever_matches(monkeypatch):
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def counting(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(server.auth.hmac, "compare_digest", counting)
    interceptor = BearerTokenInterceptor(["t1", "a-much-longer-token-2", "t3"], "cbam.v1.InferenceService")
    for given in ("Bearer t1", "Bearer nope", "", "Bearer a-much-longer-token-2"):
        calls.clear()
        interceptor._authorized(_Details("/cbam.v1.InferenceService/Classify", [("authorization", given)]))
        assert len(calls) == 3, "stopped comparing at the first match"
        # equal lengths: the time compare_digest takes says nothing about a token's length
        assert len({len(a) for a, _ in calls} | {len(b) for _, b in calls}) == 1


# -- over the wire --------------------------------------------------------------------------------------


def _auth(token: str | None):
    return None if token is None else [("authorization", token)]


async def _status(coro) -> tuple[grpc.StatusCode, str]:
    try:
        await coro
    except grpc.RpcError as exc:  # the asyncio client's AioRpcError, or the synchronous client's
        return exc.code(), exc.details()
    return grpc.StatusCode.OK, ""


@pytest.fixture
async def guarded(make_server, env):
    env.set("CBAM_AUTH__TOKENS", ",".join(TOKENS))
    server = await make_server()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield server, channel


BAD = [
    None, "", "Bearer", "Bearer ", "Bearer wrong", f"Bearer {TOKENS[0]}x", f"Bearer {TOKENS[0][:-1]}",
    f"Basic {TOKENS[0]}", TOKENS[0], f"Bearer  {TOKENS[0]}", f"Bearer {TOKENS[0]},{TOKENS[1]}",
]  # fmt: skip


async def test_missing_or_wrong_tokens_get_one_and_the_same_refusal(guarded):
    server, channel = guarded
    stub = inference_pb2_grpc.InferenceServiceStub(channel)
    messages = set()
    request = pb.ClassifyRequest(encoded=IMAGE)
    for token in BAD:
        metadata = _auth(token)
        for call in (
            stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=60, metadata=metadata),
            stub.Classify(request, timeout=60, metadata=metadata),
            _refused_stream(server.port, request, metadata),
            stub.ClassifyBatch(pb.ClassifyBatchRequest(items=[request]), timeout=60, metadata=metadata),
        ):
            code, message = await _status(call)
            assert code is grpc.StatusCode.UNAUTHENTICATED, (token, code)
            messages.add(message)
    assert len(messages) == 1, messages  # never says whether the token was missing, malformed or wrong
    assert server.metrics.registry.get_sample_value("cbam_batch_size_count") in (None, 0.0), "work was done"


async def test_refusals_are_counted_without_deserialising_the_request(make_server, env, monkeypatch):
    """cbam_requests_total{code="UNAUTHENTICATED"} is what a brute-force alert watches; and a caller
    without a token does not get the server to parse its (possibly 16 MiB) message."""
    parsed = []
    real, real_batch = pb.ClassifyRequest.FromString, pb.ClassifyBatchRequest.FromString
    monkeypatch.setattr(pb.ClassifyRequest, "FromString", lambda data: parsed.append(1) or real(data))
    monkeypatch.setattr(
        pb.ClassifyBatchRequest, "FromString", lambda data: parsed.append(2) or real_batch(data)
    )
    env.set("CBAM_AUTH__TOKENS", ",".join(TOKENS))
    server = await make_server()  # registers the (patched) deserialiser
    request = pb.ClassifyRequest(encoded=IMAGE)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        for _ in range(3):
            await _status(stub.Classify(request, timeout=10, metadata=_auth("Bearer x")))
        await _status(stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10))
        await _status(_drain(stub.ClassifyStream(iter([request]), timeout=10)))
        await _status(stub.ClassifyBatch(pb.ClassifyBatchRequest(items=[request]), timeout=10))
        assert not parsed
        await stub.Classify(request, timeout=10, metadata=_auth(f"Bearer {TOKENS[0]}"))
        batch = pb.ClassifyBatchRequest(items=[request])
        await stub.ClassifyBatch(batch, timeout=10, metadata=_auth(f"Bearer {TOKENS[0]}"))
        assert parsed == [1, 2], "the patched deserialisers are not the server's: this test checks nothing"

    def refused(method: str) -> float | None:
        labels = {"method": method, "code": "UNAUTHENTICATED"}
        return server.metrics.registry.get_sample_value("cbam_requests_total", labels)

    counts = [refused(m) for m in ("Classify", "GetModelInfo", "ClassifyStream", "ClassifyBatch")]
    assert counts == [3, 1, 1, 1]


async def _drain(call):
    return [answer async for answer in call]


async def _refused_stream(port: int, request: pb.ClassifyRequest, metadata) -> None:
    """A ClassifyStream over the synchronous API, in a thread. When a server ends a stream before the
    client has sent all of it (as a refusal at the door does), the asyncio client can report INTERNAL
    "Internal error from Core" instead of the server's status, more often the busier the machine
    (grpc/grpc#36066); the synchronous client reports what the server sent."""

    def call() -> None:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stream = inference_pb2_grpc.InferenceServiceStub(channel).ClassifyStream
            list(stream(iter([request]), timeout=60, metadata=metadata))

    await asyncio.to_thread(call)


async def test_every_configured_token_is_accepted(guarded):
    _, channel = guarded
    stub = inference_pb2_grpc.InferenceServiceStub(channel)
    request = pb.ClassifyRequest(encoded=IMAGE)
    for token in TOKENS:
        for scheme in ("Bearer", "bearer"):  # RFC 6750: the scheme is case-insensitive
            metadata = _auth(f"{scheme} {token}")
            assert (await stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10, metadata=metadata)).labels
            assert (await stub.Classify(request, timeout=10, metadata=metadata)).labels
            answers = await _drain(stub.ClassifyStream(iter([request]), timeout=10, metadata=metadata))
            assert answers[0].WhichOneof("outcome") == "response"


async def test_health_and_reflection_stay_open_without_a_token(guarded):
    _, channel = guarded
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
    watch.cancel()
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    async for answer in stub.ServerReflectionInfo(iter([request]), timeout=10):
        names = {s.name for s in answer.list_services_response.service}
        assert "cbam.v1.InferenceService" in names
        break


async def test_without_tokens_nothing_is_asked(make_server):
    server = await make_server()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        assert (await stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)).labels


async def test_many_concurrent_bad_tokens_do_not_disturb_good_calls(guarded):
    _, channel = guarded
    stub = inference_pb2_grpc.InferenceServiceStub(channel)
    good = _auth(f"Bearer {TOKENS[1]}")
    calls = [stub.Classify(pb.ClassifyRequest(encoded=IMAGE), timeout=30, metadata=good) for _ in range(20)]
    calls += [stub.Classify(pb.ClassifyRequest(encoded=IMAGE), timeout=30, metadata=_auth(f"Bearer x{i}"))
              for i in range(200)]  # fmt: skip
    codes = [code for code, _ in await asyncio.gather(*(_status(c) for c in calls))]
    assert codes[:20] == [grpc.StatusCode.OK] * 20
    assert set(codes[20:]) == {grpc.StatusCode.UNAUTHENTICATED}


@pytest.mark.slow
def test_tokens_never_reach_the_log():
    """A real server at DEBUG, called with right and wrong tokens: neither appears in its output."""
    with ServerProcess("--log.level", "DEBUG", env={"CBAM_AUTH__TOKENS": ",".join(TOKENS)}) as server:
        with grpc.insecure_channel(server.address) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            request = pb.ClassifyRequest(encoded=IMAGE)
            stub.Classify(request, timeout=10, metadata=_auth(f"Bearer {TOKENS[0]}"))
            with pytest.raises(grpc.RpcError):
                stub.Classify(request, timeout=10, metadata=_auth("Bearer guess-123"))
        server.stop()
    assert server.events_named("request")
    for secret in (*TOKENS, "guess-123"):
        assert secret not in server.output


@pytest.mark.parametrize("source", ["env-comma", "env-json", "file"])
def test_a_refused_token_setting_does_not_echo_the_tokens(tmp_path, source):
    """cbam-serve names the bad setting, but never prints what it got: that would be the secrets."""
    secrets = ["good-token-4f1c", "bad token-9e2a"]
    env, argv = {}, []
    if source == "env-comma":
        env["CBAM_AUTH__TOKENS"] = ",".join(secrets)
    elif source == "env-json":
        env["CBAM_AUTH__TOKENS"] = json.dumps(secrets)
    else:
        path = tmp_path / "tokens"
        path.write_text("\n".join(secrets) + "\n")
        argv = ["--auth.tokens_file", str(path)]
    result = run_to_exit(*argv, env=env)
    assert result.returncode == 2
    assert "auth" in result.output
    for secret in secrets:
        for part in secret.split():
            assert part not in result.output, result.output
