#!/usr/bin/env bash
# Run the GPU benchmarks and GPU tests on a lent device machine, writing everything under $OUT.
#
#   bash benchmarks/device_run.sh serve        # GPU tests (1 and 2 GPUs) + serving benchmark(s)  ~6 min
#   bash benchmarks/device_run.sh layer        # MoE layer, profile, decode regime, inference-path sweep ~8 min
#   bash benchmarks/device_run.sh finetune     # fine-tune throughput vs AutoEP and HF             ~3 min
#   bash benchmarks/device_run.sh ep           # EP scaling + fine-tune at EP = every GPU (2+)      ~4 min
#   bash benchmarks/device_run.sh train        # 2+ GPUs, NCCL: EP layer equivalence + the launcher tests ~10 min
#
# The device image lacks deepspeed, datasets and the HTTP stack: the wheels in .whl (git-ignored; how to
# fetch them: /work/.library/device/README.md) are installed into /tmp/site first, so the call needs
# carry [".whl"]. Each group fits one call (10 minutes); results land in $OUT as <name>.json and
# <name>.log, to be copied into benchmarks/results/ with the command recorded in each JSON's meta.
set -uo pipefail
group=${1:?"usage: bash benchmarks/device_run.sh serve|layer|finetune|ep|train"}
out=${OUT:?"OUT must name the folder results go to"}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
# the second entry: QuACK's CuTe DSL packages, where benchmarks/device_quack.sh installed them (else absent, harmless)
export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:$PWD/integration:$PWD/tests PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# the serve launcher starts `deepspeed` from beside the interpreter
cp /tmp/site/bin/deepspeed "$(dirname "$(python3 -c 'import sys; print(sys.executable)')")/" 2>/dev/null
gpus=$(nvidia-smi -L | wc -l)

run() {  # run NAME SECONDS COMMAND...: log to $out/NAME.log, print its tail
    local name=$1 seconds=$2
    shift 2
    echo "== $name (${seconds}s max): $*"
    timeout "$seconds" "$@" >"$out/$name.log" 2>&1
    echo "   exit $?"
    grep -v -i warning "$out/$name.log" | tail -n 6
}

case $group in
serve)
    run gpu_tests 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests/unit/test_serve_cuda_graphs.py \
        tests/unit/test_experts.py tests/unit/test_swiglu_ffn.py tests/unit/test_moe_small_batch.py tests/unit/test_kernels.py
    run serve 240 python3 benchmarks/serve.py --out "$out/serve.json" --ep 1
    if [ "$gpus" -ge 2 ]; then
        run serve_ep2 150 python3 benchmarks/serve.py --out "$out/serve_ep2.json" --ep 2 --skip-generate --batches 1,64
    fi
    ;;
layer)
    run moe_layer 240 env CUDA_VISIBLE_DEVICES=0 python3 benchmarks/moe_layer.py --out "$out/moe_layer.json" \
        --shapes mixtral_8x7b olmoe qwen3_30b_a3b finetune_llama_8x
    run moe_decode 120 env CUDA_VISIBLE_DEVICES=0 python3 benchmarks/moe_decode.py --out "$out/moe_decode.json"
    run moe_layer_profile 150 env CUDA_VISIBLE_DEVICES=0 python3 benchmarks/moe_layer_profile.py --out "$out/moe_layer_profile.json"
    run small_batch_sweep 90 env CUDA_VISIBLE_DEVICES=0 python3 benchmarks/small_batch_sweep.py --threshold-only \
        --out "$out/small_batch_sweep_paths.json"
    ;;
finetune)
    run gpu_tests 280 python3 -m pytest -q -p no:cacheprovider -m gpu tests/unit/test_cuda_graph.py tests/unit/test_adamw_update.py \
        tests/integration/test_finetune_offload_gpu.py
    run finetune 560 env CUDA_VISIBLE_DEVICES=0 python3 benchmarks/finetune.py --out "$out/finetune.json" \
        --variant-experts-impl grouped_mm --variant-cuda-graph
    ;;
ep)
    if [ "$gpus" -lt 2 ]; then echo "ep needs 2+ GPUs, this machine has $gpus"; exit 1; fi
    run ep_scaling 240 torchrun --nproc_per_node "$gpus" benchmarks/ep_scaling.py --out "$out/ep_scaling.json"
    run finetune_ep 330 torchrun --nproc_per_node "$gpus" benchmarks/finetune.py --ep "$gpus" \
        --out "$out/finetune_ep$gpus.json"
    ;;
train)
    # the 2-rank tests of tests/integration/test_finetune.py launch `deepspeed --num_gpus 2`: rank r on GPU r
    if [ "$gpus" -lt 2 ]; then echo "train needs 2+ GPUs, this machine has $gpus"; exit 1; fi
    run gpu_equivalence 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/distributed/test_moe_equivalence.py
    run finetune_tests 520 python3 -m pytest -q -p no:cacheprovider --durations=10 tests/integration/test_finetune.py \
        -k "not dp2xep2 and not tp2xep2 and not pp2xep2 and not pp4"
    ;;
*)
    echo "unknown group $group: serve | layer | finetune | ep | train"
    exit 2
    ;;
esac
