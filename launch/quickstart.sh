#!/usr/bin/env bash
# What `make demo` runs: the whole current product on CPU ranks (GPUs are used when present).
#
#     bash launch/quickstart.sh        # after `make install`, with .venv/bin on PATH
#
# 1. the rank layout of an 8-GPU job (tp=2, ep=2) and which experts each rank holds;
# 2. two ranks exchanging tokens through switchyard's differentiable all-to-all (deepspeed launcher);
# 3. an expert-parallel MoE layer on two ranks, checked against one process, then a DeepSpeed ZeRO-2 step.
set -euo pipefail
cd "$(dirname "$0")/.."
RANKS="${RANKS:-2}"
quiet() { grep -v -E "\[(INFO|WARNING)\]|FutureWarning|return func" || true; }

echo "== 1. rank layout: 8 GPUs, tp=2, ep=2, 8 experts =="
switchyard layout --world 8 --tp 2 --ep 2 --num-experts 8

echo; echo "== 2. all-to-all on ${RANKS} ranks (deepspeed launcher) =="
deepspeed --num_gpus "$RANKS" launch/all_to_all_demo.py 2>&1 | quiet

echo; echo "== 3. expert-parallel MoE layer on ${RANKS} ranks vs one process, then DeepSpeed ZeRO-2 =="
deepspeed --num_gpus "$RANKS" launch/moe_layer_demo.py 2>&1 | quiet
