# Shortcuts; the README's two commands are the supported way in.
PY ?= .venv/bin/python

.PHONY: setup serve test proto lint bench
setup:
	bash scripts/setup.sh
serve: setup
	.venv/bin/cbam-serve
test:
	bash .ci/run
# Regenerate the protobuf/gRPC modules from proto/ (tests/test_proto.py fails when they drift).
PROTOS = proto/cbam/v1/inference.proto proto/cbam/oip/model_config.proto proto/cbam/oip/grpc_service.proto
proto:
	$(PY) -m grpc_tools.protoc -Iproto --python_out=proto --pyi_out=proto --grpc_python_out=proto $(PROTOS)
lint:
	$(PY) -m ruff check .
bench:
	.venv/bin/cbam-bench
