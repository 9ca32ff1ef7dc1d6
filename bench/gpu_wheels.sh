#!/usr/bin/env bash
# Downloads into .whl/ the wheels the GPU machine's image lacks, for CPython 3.12 / manylinux x86-64.
#
# The image (Python 3.12, torch 2.11, transformers 5.17, triton 3.6, accelerate 1.15, pyarrow,
# pandas, fsspec, xxhash, huggingface_hub, ...) has no `datasets` and no package registry; of
# `datasets`' own dependencies it lacks only dill and multiprocess. Versions are pinned to the ones
# the suite passes with here. Run from the repository root, where PyPI is reachable:
#
#     bash bench/gpu_wheels.sh
#
# then on the device machine (see bench/gpu_check.py's docstring; carry .whl):
#
#     python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && PYTHONPATH=/tmp/site:. python3 bench/gpu_check.py
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS=(datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19)
mkdir -p .whl
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .whl "${WHEELS[@]}"
ls -l .whl
