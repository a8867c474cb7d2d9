#!/usr/bin/env bash
# Issue 14's GPU measurements, prepared and tested on the CPU; each part fits one 10-minute device call.
#
#   bash benchmarks/gpu_wheels.sh                      # here, once: the wheels the GPU machine lacks
#   run(command="bash benchmarks/gpu_session.sh 1", carry=[".whl"], timeout_s=600)   # on the lent GPU
#   run(command="bash benchmarks/gpu_session.sh 2", carry=[".whl"], timeout_s=600)
#
# Part 1: exactness of the tiny families in float32 and bfloat16; SD3-M and Flux.1-dev at full size,
#         1024², 12 steps (plain_half shows the per-step time is constant), every mode.
# Part 2: SD3.5-L at full size; Flux.1-dev with an int8 weight-only transformer under model CPU
#         offload (the 24 GB recipe's peak memory).
# Results land in benchmarks/results/ and, on the device machine, in $OUT (what comes back).
set -uo pipefail
cd "$(dirname "$0")/.."
part=${1:?give the part: 1 or 2}
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
out=${OUT:-benchmarks/results}
log="$out/gpu_session_$part.log"
step() { echo "== $*" | tee -a "$log"; timeout "$@" 2>&1 | tee -a "$log"; }
nvidia-smi --query-gpu=name,memory.total --format=csv | tee -a "$log"
case "$part" in
    1) step 120 python3 benchmarks/exactness.py --device cuda
       step 420 python3 benchmarks/real_scale.py --device cuda --dtype bfloat16 --presets sd3-medium flux.1-dev \
           --steps 12 --repeats 2 ;;
    2) step 330 python3 benchmarks/real_scale.py --device cuda --dtype bfloat16 --presets sd3.5-large --steps 12 \
           --repeats 2
       step 200 python3 benchmarks/real_scale.py --device cuda --dtype bfloat16 --presets flux.1-dev --steps 4 \
           --repeats 1 --quantize int8 --offload --modes plain record plain2 edit ;;
    *) echo "unknown part $part: give 1 or 2"; exit 2 ;;
esac
[ "$out" = benchmarks/results ] || cp benchmarks/results/*cuda* "$out/" 2>/dev/null
exit 0
