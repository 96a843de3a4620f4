"""The generated modules in proto/ are exactly what `make proto` makes from the .proto today."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# In `make proto`'s order: an imported file before the ones that import it.
PROTOS = ["cbam/v1/inference.proto", "cbam/oip/model_config.proto", "cbam/oip/grpc_service.proto"]
GENERATED = [
    f"{proto.removesuffix('.proto')}{suffix}"
    for proto in PROTOS
    for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
]

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
         f"--grpc_python_out={out}", *(f"proto/{proto}" for proto in PROTOS)],
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


def test_oip_stubs_name_the_service() -> None:
    from cbam.oip import grpc_service_pb2, grpc_service_pb2_grpc

    assert grpc_service_pb2.DESCRIPTOR.package == "inference"
    service = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert service.full_name == "inference.GRPCInferenceService"
    assert {"ModelInfer", "ModelStreamInfer", "ModelConfig", "ModelStatistics"} <= set(
        service.methods_by_name
    )
    assert hasattr(grpc_service_pb2_grpc, "GRPCInferenceServiceStub")


def test_oip_messages_match_tritonclients_field_for_field() -> None:
    """Every message, field and RPC of ours is in tritonclient's definitions with the same number,
    type and label, so each side parses the other's messages (fields one side lacks are skipped)."""
    from cbam.oip import grpc_service_pb2, model_config_pb2
    from tests.oip_layout import layout

    ours = layout([model_config_pb2.DESCRIPTOR, grpc_service_pb2.DESCRIPTOR])
    done = subprocess.run(
        [sys.executable, "tests/oip_layout.py"], cwd=ROOT, check=True, capture_output=True, text=True
    )
    theirs = json.loads(done.stdout)
    assert ours["services"] == theirs["services"]
    # KServe's ModelMetadataResponse.properties (field 6, a map) is not in Triton's definition.
    kserve_only = {
        "inference.ModelMetadataResponse.properties",
        "inference.ModelMetadataResponse.PropertiesEntry",
    }
    for message, fields in ours["messages"].items():
        if message in kserve_only:
            continue
        assert message in theirs["messages"], f"{message} is not tritonclient's"
        for name, wire in fields.items():
            if f"{message}.{name}" not in kserve_only:
                assert theirs["messages"][message].get(name) == wire, f"{message}.{name}"
    # The KServe-only field takes a number Triton leaves free.
    numbers = {wire[0] for wire in theirs["messages"]["inference.ModelMetadataResponse"].values()}
    assert ours["messages"]["inference.ModelMetadataResponse"]["properties"][0] not in numbers
