"""The wire layout of protobuf files: every message's fields (number, type, repeated, message or enum type)
and every service's methods. `python tests/oip_layout.py` prints tritonclient's as JSON: its modules
and ours define the same `inference.*` symbols, which protobuf refuses to load into one process."""

from __future__ import annotations

import json
import sys

__all__ = ["layout"]


def layout(files) -> dict:
    """{"messages": {full name: {field: [number, type, repeated, type name]}}, "services": {...}}."""
    messages: dict[str, dict[str, list]] = {}
    services: dict[str, dict[str, list]] = {}

    def visit(message) -> None:
        messages[message.full_name] = {
            field.name: [field.number, field.type, field.is_repeated, _type_name(field)]
            for field in message.fields
        }
        for nested in message.nested_types:
            visit(nested)

    for file in files:
        for message in file.message_types_by_name.values():
            visit(message)
        for service in file.services_by_name.values():
            services[service.full_name] = {
                method.name: [method.input_type.full_name, method.output_type.full_name,
                              method.client_streaming, method.server_streaming]
                for method in service.methods
            }  # fmt: skip
    return {"messages": messages, "services": services}


def _type_name(field) -> str:
    if field.message_type is not None:
        return field.message_type.full_name
    if field.enum_type is not None:
        return field.enum_type.full_name
    return ""


if __name__ == "__main__":
    from tritonclient.grpc import model_config_pb2, service_pb2

    json.dump(layout([model_config_pb2.DESCRIPTOR, service_pb2.DESCRIPTOR]), sys.stdout)
