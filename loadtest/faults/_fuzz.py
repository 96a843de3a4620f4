"""Fuzzed protobuf bytes for every method a server offers, generated with hypothesis.

The methods come from the server's own reflection service, so a service added to the port is fuzzed
without a change here. A body is either random bytes or a message in protobuf's wire format built from
the method's request descriptor: its real field numbers (and made-up ones), with the right wire type
or a wrong one, values of any size, length prefixes that lie, nested messages, and truncation.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

__all__ = ["Method", "examples", "fuzzed_bodies", "served_methods"]

_VARINT, _FIXED64, _LENGTH, _START_GROUP, _END_GROUP, _FIXED32 = 0, 1, 2, 3, 4, 5
_WIRE_TYPES = {
    FieldDescriptor.TYPE_DOUBLE: _FIXED64,
    FieldDescriptor.TYPE_FIXED64: _FIXED64,
    FieldDescriptor.TYPE_SFIXED64: _FIXED64,
    FieldDescriptor.TYPE_FLOAT: _FIXED32,
    FieldDescriptor.TYPE_FIXED32: _FIXED32,
    FieldDescriptor.TYPE_SFIXED32: _FIXED32,
    FieldDescriptor.TYPE_STRING: _LENGTH,
    FieldDescriptor.TYPE_BYTES: _LENGTH,
    FieldDescriptor.TYPE_MESSAGE: _LENGTH,
}  # every other type is a varint


@dataclass(frozen=True)
class Method:
    """One method a server offers: ``path`` is what a channel calls ("/package.Service/Method")."""

    path: str
    request: Descriptor
    client_streaming: bool
    server_streaming: bool


def served_methods(target: str) -> list[Method]:
    """Every method of every service the server at ``target`` lists by reflection."""
    with grpc.insecure_channel(target) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        pool = DescriptorPool(database)
        methods = []
        for name in database.get_services():
            service = pool.FindServiceByName(name)
            for m in service.methods:
                methods.append(
                    Method(
                        f"/{service.full_name}/{m.name}", m.input_type, m.client_streaming, m.server_streaming
                    )
                )
    return methods


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def fuzzed_bodies(request: Descriptor):
    """A hypothesis strategy of request bodies for a method whose request message is ``request``."""
    from hypothesis import strategies as st  # only fault-injection runs need hypothesis

    @st.composite
    def message(draw, descriptor: Descriptor | None, depth: int) -> bytes:
        fields = list(descriptor.fields) if descriptor is not None else []
        parts = []
        for _ in range(draw(st.integers(0, 6))):
            field = draw(st.sampled_from(fields)) if fields and draw(st.integers(0, 4)) else None
            number = field.number if field is not None else draw(st.integers(1, 2**29 - 1))
            if field is not None and draw(st.integers(0, 5)):
                wire_type = _WIRE_TYPES.get(field.type, _VARINT)
            else:
                wire_type = draw(st.integers(0, 7))  # 6 and 7 are no wire type at all
            payload = b""
            if wire_type == _VARINT:
                payload = _varint(draw(st.integers(0, 2**64 - 1)))
            elif wire_type == _FIXED64:
                payload = draw(st.binary(min_size=8, max_size=8))
            elif wire_type == _FIXED32:
                payload = draw(st.binary(min_size=4, max_size=4))
            elif wire_type == _LENGTH:
                nested = field.message_type if field is not None and field.message_type is not None else None
                if nested is not None and depth > 0 and draw(st.booleans()):
                    content = draw(message(nested, depth - 1))
                else:
                    content = draw(st.one_of(st.binary(max_size=64), st.text(max_size=16).map(str.encode)))
                length = len(content) if draw(st.integers(0, 7)) else draw(st.integers(0, 2**32))
                payload = _varint(length) + content
            parts.append(_varint(number << 3 | wire_type) + payload)
        data = b"".join(parts)
        if data and not draw(st.integers(0, 9)):  # cut short
            data = data[: draw(st.integers(0, len(data) - 1))]
        return data

    return st.one_of(st.binary(max_size=64), message(request, 2))


def examples(strategy, count: int, seed: int = 0) -> list:
    """``count`` values of a hypothesis ``strategy`` (fewer when it has fewer), the same every time."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as seeded

    found: list = []

    @seeded(seed)
    @settings(
        max_examples=count,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def collect(value) -> None:
        found.append(value)

    collect()
    return found
