# T5-from-scratch experiment: four arms side by side on one GPU, plus the exactness checks on CUDA.
# Ran once as `bash .gpu/go.sh 4.25 1.75` on a lent H100 from the repository root, with this folder's
# t5arm.py at .gpu/t5arm.py, main's presets.py, toy/model.py and toy/train.py with
# ../t5_cpu_finetune/t5.patch applied in .gpu/t5files, and wheels of diffusers 0.42.1, nnsight
# 0.8.1 and nnsight's missing needs in .whl (the GPU image has neither). .gpu/cuda_check.py is now
# benchmarks/exactness.py.
M1=${1:-4.5}; M2=${2:-1.75}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 TQDM_MININTERVAL=30
nvidia-smi -L
python3 -c "import torch, diffusers, transformers; print(torch.__version__, diffusers.__version__, transformers.__version__, torch.cuda.is_available())" || exit 1
mkdir -p /tmp/t5pkg /tmp/runs && cp -r mmdit_probe /tmp/t5pkg/ && cp .gpu/t5files/presets.py /tmp/t5pkg/mmdit_probe/ && cp .gpu/t5files/model.py .gpu/t5files/train.py /tmp/t5pkg/mmdit_probe/toy/ || exit 1
arm() { n=$1; shift; python3 .gpu/t5arm.py $n "$@" > /tmp/$n.log 2>&1; echo "$n exit $?"; }
arm ctl . 0 0 0 $M1 $M2 40000 cuda /tmp/runs &
arm t5 /tmp/t5pkg 1 0.3 0.3 $M1 $M2 40000 cuda /tmp/runs &
arm t5c /tmp/t5pkg 1 0.5 0.1 $M1 $M2 40000 cuda /tmp/runs &
arm t5l1 /tmp/t5pkg 1 0.3 0.3 $M1 $M2 40000 cuda /tmp/runs 1 &
PYTHONPATH=/tmp/site:$PWD python3 .gpu/cuda_check.py cuda $OUT/cuda_check.json > /tmp/cuda_check.log 2>&1; echo "cuda_check exit $?"
grep -v "it/s\]" /tmp/cuda_check.log | grep -E "^(sd3|flux)" | cut -c1-400
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv
wait
cp /tmp/runs/*.tgz $OUT/
for f in /tmp/*.log; do echo "=== $f"; tail -c 2000 $f; done > $OUT/logs.txt
grep -h '"steps"' /tmp/*.log | cut -c1-300
ls -la $OUT
