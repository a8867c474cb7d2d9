#!/usr/bin/env bash
# Fetch here, into .whl/ (git-ignored), the wheels a lent GPU machine lacks: it has Python 3.12 with
# CUDA torch, transformers, accelerate, safetensors, scipy and pyarrow, but not diffusers, nnsight
# (and those of its needs it lacks) or torchao. Versions are the ones this project is tested with.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64 manylinux_2_34_x86_64 manylinux_2_31_x86_64; do
    platforms+=(--platform "$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
    -d .whl diffusers==0.42.1 nnsight==0.8.1 torchao==0.18.0 pydantic==2.14.4 pydantic-core==2.50.5 \
    annotated-types==0.8.0 typing-inspection==0.4.5 greenlet==3.5.6 websocket-client==1.9.2 zstandard==0.25.0 \
    importlib-metadata==10.2.0
du -sh .whl
