"""The generated modules in proto/ are exactly what `make proto` makes from the .proto today."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROTO = "cbam/v1/inference.proto"
GENERATED = ["cbam/v1/inference_pb2.py", "cbam/v1/inference_pb2.pyi", "cbam/v1/inference_pb2_grpc.py"]

# Lines that only stamp the generator's version: a different grpcio-tools/protobuf release may
# write other numbers there without the contract having changed.
_VERSION_STAMPS = [
    (re.compile(r"^# Protobuf Python Version: .*$", re.M), "# Protobuf Python Version: X"),
    (re.compile(r"^GRPC_GENERATED_VERSION = .*$", re.M), "GRPC_GENERATED_VERSION = X"),
    (
        re.compile(r"_runtime_version\.ValidateProtobufRuntimeVersion\(\s*[^)]*\)", re.S),
        "_runtime_version.ValidateProtobufRuntimeVersion(X)",
    ),
]


def normalise(text: str) -> str:
    for pattern, replacement in _VERSION_STAMPS:
        text = pattern.sub(replacement, text)
    return text


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("proto")
    # The same command as `make proto`, writing into a temporary directory.
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-Iproto", f"--python_out={out}", f"--pyi_out={out}",
         f"--grpc_python_out={out}", f"proto/{PROTO}"],
        cwd=ROOT, check=True, capture_output=True,
    )  # fmt: skip
    return out


@pytest.mark.parametrize("name", GENERATED)
def test_generated_module_matches_the_proto(regenerated: Path, name: str) -> None:
    committed = (ROOT / "proto" / name).read_text()
    fresh = (regenerated / name).read_text()
    assert normalise(committed) == normalise(fresh), f"proto/{name} is stale: run `make proto`"


def test_normalising_leaves_the_contract_alone() -> None:
    # The drift check must still see a changed message.
    a = "GRPC_GENERATED_VERSION = '1.85.1'\nDESCRIPTOR = b'x'\n"
    b = "GRPC_GENERATED_VERSION = '1.70.0'\nDESCRIPTOR = b'y'\n"
    assert normalise(a) != normalise(b)
    assert normalise(a) == normalise(a.replace("1.85.1", "1.70.0"))


def test_stubs_import_and_name_the_service() -> None:
    from cbam.v1 import inference_pb2, inference_pb2_grpc

    assert inference_pb2.DESCRIPTOR.package == "cbam.v1"
    service = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"]
    methods = ["Classify", "ClassifyStream", "ClassifyBatch", "GetModelInfo"]
    assert [m.name for m in service.methods] == methods
    assert hasattr(inference_pb2_grpc, "InferenceServiceStub")
