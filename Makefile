# The two quick-start commands (README): `make serve` and `make test`.
# Both create the virtual environment on first use. torch==2.13.0 is pinned because that CPU
# wheel is what CI machines install offline; a GPU cluster installs its CUDA build instead.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
CHECKPOINT ?= checkpoints/tiny-mixtral
PRESET ?= tiny-mixtral
CONFIG ?= infra/deploy/local-tiny-mixtral.yaml

$(BIN)/mixserve: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	# the compiled dispatch kernel, built once here rather than at the first replica's start (~25 s)
	$(BIN)/python -m mixserve.expert_shards.dispatch_kernel || echo "continuing without the compiled dispatch kernel"
	touch $@

.PHONY: install serve test demo-checkpoint protos
install: $(BIN)/mixserve

$(CHECKPOINT)/config.json: | $(BIN)/mixserve
	$(BIN)/mixserve init-checkpoint $(CHECKPOINT) --preset $(PRESET)

demo-checkpoint: $(CHECKPOINT)/config.json

serve: $(BIN)/mixserve $(CHECKPOINT)/config.json
	$(BIN)/mixserve serve $(CONFIG)

test: $(BIN)/mixserve
	$(BIN)/python -m pytest -q tests

# Regenerates the gRPC modules from mixserve/platform/grpc_api/mixserve_v1.proto (generated code is
# committed, so serving needs no protoc). Needs grpcio-tools, a development tool only.
protos: $(BIN)/mixserve
	$(BIN)/pip install -q grpcio-tools
	$(BIN)/python -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. --pyi_out=. \
		mixserve/platform/grpc_api/mixserve_v1.proto
