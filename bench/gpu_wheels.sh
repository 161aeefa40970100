#!/usr/bin/env bash
# Build .whl/: the wheels that the GPU machine's image (Python 3.12, x86-64, no network) lacks for bench/gpu.sh.
# The image already has torch, accelerate, safetensors, tokenizers, huggingface-hub, peft, typer, rich, pandas,
# pyarrow, fsspec, xxhash, numpy, pyyaml (see docs/gpu.md). Run here, from the repository root:
#   bench/gpu_wheels.sh            # then carry .whl with the working tree; bench/gpu.sh installs it into /tmp/site
set -euo pipefail
PY=${PYTHON:-python3}
DEST=${1:-.whl}
mkdir -p "$DEST"
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
WHEELS=(
  datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 fsspec==2026.9.0  # datasets and what it pins
  gguf==0.19.0                                                        # to read the SmolLM2 .gguf
  pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
)
# The image's transformers is 5.17 (the project pins 5.23; 5.17 ran every stage on an H200 before). Carry 5.23
# (13 MB) only on request: its import checks the image's regex/tokenizers/huggingface-hub versions.
if [ "${KVC_WHEELS_TRANSFORMERS:-0}" = 1 ]; then WHEELS+=(transformers==5.23.0); fi
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLATFORMS[@]}" \
  -d "$DEST" "${WHEELS[@]}"
du -ch "$DEST"/*.whl | tail -1
