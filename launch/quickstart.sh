#!/usr/bin/env bash
# What `make demo` runs: the README's main job on the embedded default, on CPU ranks (GPUs when present).
#
#     bash launch/quickstart.sh        # after `make install` (uses .venv when there, else what PATH finds)
#
# 1. the rank layout of an 8-GPU job (tp=2, ep=2) and which experts each rank holds;
# 2. dense tiny Llama → upcycle (4 experts, top-2) → fine-tune on 2 ranks with ep=2 → export (Mixtral)
#    → serve with ep=2 → one chat request with the openai client → SIGTERM drain.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/switchyard ]; then PATH="$PWD/.venv/bin:$PATH"; fi
if ! command -v switchyard >/dev/null; then
    echo "quickstart: switchyard is not installed: run \`make demo\` (it builds .venv first) or \`make install\`" >&2
    exit 2
fi
RANKS="${RANKS:-2}"

echo "== 1. rank layout: 8 GPUs, tp=2, ep=2, 8 experts =="
switchyard layout --world 8 --tp 2 --ep 2 --num-experts 8

echo
python launch/demo.py --ranks "$RANKS" --out runs/demo 2> >(grep -v -E "\[(INFO|WARNING)\]|FutureWarning|return func|it/s\]|examples/s\]" >&2)
