"""cbam-bench --peers without the peers: the real cbam-serve and a real loopback gRPC stand-in driven side
by side by h2load, the answer checks, the hand-framed peer messages, and the report's verdict logic (not
timed: nothing here depends on how fast the machine is)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import psutil
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from cbam.v1 import inference_pb2
from loadtest import peers
from loadtest._peer_report import (
    TARGETS,
    Target,
    describe_judgement,
    judge,
    peer_table,
    ratios,
    summarise,
    trust,
)
from loadtest._peer_servers import Answer, CbamServe, Served, _PeerProcess
from loadtest._side_by_side import _Generator, _measure, _verify, check_answer, measure_side_by_side
from loadtest._wire import grpc_frame, model_infer_request, predictions_request, read_fields
from loadtest.bench import main as bench_main
from models import DEFAULT_CHECKPOINT, load_checkpoint
from server.launcher import child_env
from tests.support import ROOT, wait_for

FAKE_PEER = Path(__file__).parent / "fake_peer.py"


class FakePeer(Served):
    """tests/loadtest/fake_peer.py as a peer: answers a fixed top-1, keeps no count of its own."""

    name = "fake"
    protocol = "a loopback gRPC stand-in, the pixels as the request"
    method = "/fake.Peer/Top1"

    def __init__(self, answer: Answer, fail_after: int | None = None) -> None:
        self.args = ["--index", str(answer.index), "--probability", repr(answer.probability)]
        self.args += [] if fail_after is None else ["--fail-after", str(fail_after)]
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(FAKE_PEER), *self.args],
            cwd=ROOT,
            env=child_env(),
            stdout=subprocess.PIPE,
            text=True,
        )
        port = self.process.stdout.readline()
        if not port:
            raise RuntimeError(f"the fake peer exited ({self.process.wait(30)}) before serving")
        self.target = f"127.0.0.1:{int(port)}"

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(30)
            self.process.stdout.close()

    def request(self, pixels: np.ndarray) -> bytes:
        return pixels.tobytes()

    def read_answer(self, message: bytes) -> Answer:
        answer = json.loads(message)
        return Answer(answer["index"], answer["probability"])

    def answered(self) -> None:
        return None

    def pids(self) -> list[int]:
        return [self.process.pid]

    def settings(self) -> dict:
        return {"fail_after": None}


@pytest.fixture(scope="module")
def default_model():
    """The default checkpoint's pixels (seed 0) and the model's probabilities for them."""
    model, meta = load_checkpoint(DEFAULT_CHECKPOINT)
    pixels = np.random.default_rng(0).integers(0, 256, (*meta.input_size, 3), dtype=np.uint8)
    return pixels, peers.reference_probabilities(model, meta, pixels)


def top1(reference: np.ndarray) -> Answer:
    return Answer(int(np.argmax(reference)), float(np.max(reference)))


def test_cbam_serve_and_a_loopback_peer_side_by_side(default_model, tmp_path):
    pixels, reference = default_model
    servers = [CbamServe(DEFAULT_CHECKPOINT), FakePeer(top1(reference))]
    run = measure_side_by_side(
        servers,
        pixels,
        reference,
        workdir=tmp_path,
        concurrency=[1, 4],
        rounds=2,
        seconds=1.0,
        warmup_seconds=0.3,
        first_warmup_seconds=0.3,
        progress=lambda text: None,
    )
    assert all(server.process is None or server.process.poll() is not None for server in servers[1:])
    assert [(r["round"], r["concurrency"], r["server"]) for r in run.rows] == [
        (0, 1, "cbam-serve"),
        (0, 1, "fake"),
        (0, 4, "cbam-serve"),
        (0, 4, "fake"),
        (1, 1, "fake"),
        (1, 1, "cbam-serve"),
        (1, 4, "fake"),
        (1, 4, "cbam-serve"),
    ]  # fmt: skip  (the order rotates by round)
    for row in run.rows:
        assert row["errors"] == 0 and row["answered"] > 0, row
        assert row["throughput"] == row["answered"] / row["seconds"]
        assert 0 < row["p50"] <= row["p99"]
        assert row["server_cores"] >= 0 and row["other_cores"] >= 0 and row["generator_cores"] >= 0
        assert row["count_mismatch"] is None
    for row in (r for r in run.rows if r["server"] == "cbam-serve"):
        assert row["server_counted"] >= 1  # cbam-serve's own count of OK Classify answers in the window
    served = run.servers["cbam-serve"]
    assert served["method"] == "/cbam.v1.InferenceService/Classify"
    assert served["settings"]["arch"] == "cbam_resnet8_cifar" and "backend" in served["settings"]
    for name in ("cbam-serve", "fake"):
        checked = run.servers[name]["answers_checked"]  # before and after the rounds
        assert len(checked) == 2 and {c["index"] for c in checked} == {top1(reference).index}

    summary = summarise(run.rows)
    assert {(e["server"], e["concurrency"]) for e in summary} == {
        (s, c) for s in ("cbam-serve", "fake") for c in (1, 4)
    }
    assert all(
        e["rounds"] == 2 and e["throughput_min"] <= e["throughput"] <= e["throughput_max"] for e in summary
    )
    (ratio_1, ratio_4) = ratios(run.rows)
    assert (ratio_1["peer"], ratio_1["concurrency"], ratio_4["concurrency"]) == ("fake", 1, 4)
    assert ratio_1["rounds"] == 2 and ratio_1["ratio_min"] <= ratio_1["ratio"] <= ratio_1["ratio_max"]
    reasons = trust(run.rows, summary, rounds=2)
    assert "only 2 round(s); at least 3 give a spread" in reasons
    judged = judge(ratios(run.rows), reasons, targets=(Target("fake", 4, 1.0), Target("triton", 32, 1.25)))
    assert [j["met"] for j in judged] == [None, None]  # too few rounds: no verdict; triton: not measured
    assert judged[0]["ratio"] == ratio_4["ratio"] and judged[1]["ratio"] is None


def test_a_peer_answering_grpc_errors_counts_errors_not_throughput(default_model, tmp_path):
    """h2load counts a gRPC error as an HTTP 200; the answers' missing bytes give them away."""
    pixels, reference = default_model
    peer = FakePeer(top1(reference), fail_after=1)  # the check call is answered, the load is not
    peer.start()
    try:
        checked = _verify(peer, pixels, reference)
        (tmp_path / "fake.body").write_bytes(grpc_frame(peer.request(pixels)))
        for _ in range(10):  # until a window holds answers, however slow the machine
            row = _measure(peer, _Generator(tmp_path, None, [0]), 2, 1.0, 0.2, checked["bytes"])
            if row["errors"]:
                break
        assert row["errors"] > 0 and row["answered"] == 0 and row["throughput"] == 0
        with pytest.raises(RuntimeError, match="fake refused the request: UNAVAILABLE: failing on purpose"):
            _verify(peer, pixels, reference)
    finally:
        peer.stop()
    summary = summarise([{**row, "round": 0}])
    assert "fake at concurrency 2 answered nothing in some round" in trust([{**row, "round": 0}], summary, 3)


def test_one_server_failing_to_start_stops_the_others(default_model, tmp_path):
    pixels, reference = default_model
    cbam = CbamServe(DEFAULT_CHECKPOINT)
    broken = FakePeer(top1(reference))
    broken.args[1] = "not-a-class"  # --index: the stand-in refuses its arguments and exits
    with pytest.raises(SystemExit, match=r"the fake peer exited \(2\) before serving"):
        measure_side_by_side(
            [cbam, broken], pixels, reference, workdir=tmp_path, concurrency=[1], rounds=1, seconds=1.0,
            warmup_seconds=0.1, progress=lambda text: None,
        )  # fmt: skip
    assert not psutil.pid_exists(cbam.pids()[0])  # started beside it, then stopped (and reaped)


def test_a_wrong_answer_is_named(default_model):
    _, reference = default_model
    best = top1(reference)
    assert check_answer(best, reference) is None
    worst = int(np.argmin(reference))
    assert "is not the top class" in check_answer(Answer(worst, float(reference[worst])), reference)
    assert "the model gives" in check_answer(Answer(best.index, best.probability * 1.1), reference)
    assert "is not one of the model's" in check_answer(Answer(len(reference), 0.5), reference)


def rows_of(throughput: dict[str, list[float]], concurrency: int, p50: dict[str, float], other: float = 0.0):
    """Windows as _measure reports them: one per server and round."""
    return [
        {
            "round": n,
            "server": server,
            "concurrency": concurrency,
            "throughput": value,
            "p50": p50[server],
            "p99": 2 * p50[server],
            "errors": 0,
            "server_cores": 1.0,
            "other_cores": other,
            "count_mismatch": None,
        }
        for server, values in throughput.items()
        for n, value in enumerate(values)
    ]


def test_targets_are_judged_on_paired_round_ratios():
    rows = rows_of({"cbam-serve": [30, 31, 29], "triton": [20, 20, 20], "torchserve": [21, 20, 19]}, 32, {
        "cbam-serve": 800, "triton": 1200, "torchserve": 1300,
    })  # fmt: skip
    rows += rows_of({"cbam-serve": [25, 25, 25], "triton": [24, 24, 24], "torchserve": [20, 21, 20]}, 1, {
        "cbam-serve": 40, "triton": 39, "torchserve": 50,
    })  # fmt: skip
    summary = summarise(rows)
    assert trust(rows, summary, rounds=3) == []
    judged = {(j["peer"], j["concurrency"]): j for j in judge(ratios(rows), [], TARGETS)}
    assert judged[("triton", 32)]["ratio"] == pytest.approx(1.5) and judged[("triton", 32)]["met"] is True
    assert (
        judged[("torchserve", 32)]["ratio"] == pytest.approx(29 / 19)
        and judged[("torchserve", 32)]["met"] is True
    )
    # More req/s than Triton at concurrency 1 but a higher p50: not "ahead".
    assert judged[("triton", 1)]["ratio"] > 1 and judged[("triton", 1)]["met"] is False
    assert judged[("torchserve", 1)]["met"] is True
    text = " ".join(describe_judgement(j) for j in judged.values())
    assert "1.50x (1.45-1.55): [green]met[/green]" in text and "p50 1.03x higher" in text


def test_spread_or_a_busy_machine_withholds_the_verdict():
    steady = {"cbam-serve": [30, 30, 30], "triton": [20, 20, 20]}
    noisy = rows_of({"cbam-serve": [30, 12, 30], "triton": [20, 20, 20]}, 32, {"cbam-serve": 1, "triton": 1})
    busy = rows_of(steady, 32, {"cbam-serve": 1, "triton": 1}, other=0.6)
    for rows, reason in (
        (noisy, "cbam-serve at concurrency 32: rounds differ by 2.50x"),
        (busy, "other processes used up to 0.60 cores"),
    ):
        reasons = trust(rows, summarise(rows), rounds=3)
        assert any(reason in r for r in reasons), reasons
        judged = judge(ratios(rows), reasons, (Target("triton", 32, 1.25),))
        assert judged[0]["ratio"] is not None and judged[0]["met"] is None
        assert "no verdict" in describe_judgement(judged[0])
    table = peer_table(summarise(noisy), "t")
    assert [column.header for column in table.columns][:4] == ["server", "c", "req/s", "range"]


def published_messages() -> dict:
    """The request messages' fields the comparison sends, declared here with the numbers of the peers'
    published protocols (the Open Inference Protocol; TorchServe's inference.proto), built by protobuf."""
    kinds = descriptor_pb2.FieldDescriptorProto
    file = descriptor_pb2.FileDescriptorProto(name="peer_check.proto", package="peer_check", syntax="proto3")

    def message(name: str, *fields: tuple, parent=file.message_type) -> descriptor_pb2.DescriptorProto:
        declared = parent.add(name=name)
        for field, number, kind, *of in fields:
            repeated = kind == "repeated"
            kind = of.pop(0) if repeated else kind
            declared.field.add(
                name=field,
                number=number,
                type=kind if isinstance(kind, int) else kinds.TYPE_MESSAGE,
                label=kinds.LABEL_REPEATED if repeated else kinds.LABEL_OPTIONAL,
                **({} if isinstance(kind, int) else {"type_name": kind}),
            )
        return declared

    string, bytes_, int64 = kinds.TYPE_STRING, kinds.TYPE_BYTES, kinds.TYPE_INT64
    message("Input", ("name", 1, string), ("datatype", 2, string), ("shape", 3, "repeated", int64))
    message("Output", ("name", 1, string))
    message(
        "ModelInferRequest",
        ("model_name", 1, string),
        ("inputs", 5, "repeated", ".peer_check.Input"),
        ("outputs", 6, "repeated", ".peer_check.Output"),
        ("raw_input_contents", 7, "repeated", bytes_),
    )
    predictions = message(
        "PredictionsRequest",
        ("model_name", 1, string),
        ("input", 3, "repeated", ".peer_check.PredictionsRequest.InputEntry"),
    )
    entry = message("InputEntry", ("key", 1, string), ("value", 2, bytes_), parent=predictions.nested_type)
    entry.options.map_entry = True
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessages([file], pool=pool)


def test_hand_framed_messages_parse_as_the_published_fields():
    classes = published_messages()
    infer = classes["peer_check.ModelInferRequest"].FromString(
        model_infer_request("m", "image", "UINT8", [1, 224, 224, 3], b"\x01\x02", ["index", "probability"])
    )
    assert infer.model_name == "m" and list(infer.raw_input_contents) == [b"\x01\x02"]
    assert [(t.name, t.datatype, list(t.shape)) for t in infer.inputs] == [
        ("image", "UINT8", [1, 224, 224, 3])
    ]
    assert [t.name for t in infer.outputs] == ["index", "probability"]
    predictions = classes["peer_check.PredictionsRequest"].FromString(
        predictions_request("cbam", {"data": b"\0" * 300})
    )
    assert predictions.model_name == "cbam" and dict(predictions.input) == {"data": b"\0" * 300}

    response = inference_pb2.ClassifyResponse(
        labels=[inference_pb2.Label(index=7, name="seven", probability=0.5)]
    )
    fields = read_fields(response.SerializeToString())
    assert read_fields(fields[2][0]) == {1: [7], 2: [b"seven"], 3: [np.float32(0.5).tobytes()]}
    framed = grpc_frame(b"abc")
    assert framed[:1] == b"\0" and int.from_bytes(framed[1:5], "big") == 3 and framed[5:] == b"abc"
    with pytest.raises(ValueError, match="runs past the end"):
        read_fields(b"\x0a\x05ab")


def test_missing_peers_are_named_with_how_to_get_them(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        bench_main(["--peers", "--peer-venvs", str(tmp_path), "--servers", "cbam-serve,triton,nginx"])
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert "--servers: unknown ['nginx']" in error
    assert f"no triton venv at {tmp_path / 'pytriton'}" in error and "cbam-bench --peers --setup" in error


def test_peers_help_comes_through_cbam_bench(capsys):
    with pytest.raises(SystemExit) as exited:
        bench_main(["--peers", "--help"])
    assert exited.value.code == 0
    shown = capsys.readouterr().out
    assert "--peer-venvs" in shown and "--setup" in shown and "h2load" in shown


def test_a_peer_that_dies_at_start_is_reported_with_its_log(tmp_path):
    dying = [sys.executable, "-c", "print('no model here', flush=True); raise SystemExit(3)"]
    process = _PeerProcess(dying, env=child_env(), cwd=tmp_path, ready=lambda: False, timeout=120)
    with pytest.raises(RuntimeError, match=r"(?s)exited; its log ends:\nno model here"):
        process.start()


def test_stopping_a_peer_stops_its_children_too(tmp_path):
    """A peer is a process tree (PyTriton: launcher, tritonserver, stub; TorchServe: CLI, JVM, workers)."""
    tree = ["sh", "-c", "sleep 300 & sleep 300 & wait"]
    process = _PeerProcess(tree, env=child_env(), cwd=tmp_path, ready=lambda: True, timeout=120)
    process.start()
    group = process.process.pid
    # The shell starts them as it gets the CPU.
    children = wait_for(
        lambda: len(found := psutil.Process(group).children(recursive=True)) == 2 and found,
        what="the two children",
    )
    process.stop()
    with pytest.raises(ProcessLookupError):
        os.killpg(group, 0)
    assert not any(child.is_running() and child.status() != psutil.STATUS_ZOMBIE for child in children)
