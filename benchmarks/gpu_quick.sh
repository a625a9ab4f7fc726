#!/usr/bin/env bash
# The headline cells on a GPU in one command:
#
#   bash benchmarks/gpu_quick.sh [run.py options, e.g. --budget-s 240]
#
# runs `benchmarks/run.py --gpu-quick` (mixture, mlp, digits and the conv U-Net; the methods
# tagged "gpu-quick", the unet's tagged "unet"; a 270 s wall-clock budget by default) with
# jadeis from this checkout's src/, and writes benchmarks/results/gpu-quick-<device kind>/.
# Where $OUT is set (the device tool), the results folder is also packed into
# $OUT/<folder>.tar.gz (the tool returns at most 8 files).
#
# On a machine without network access, carry `benchmarks/.cache`: it holds the trained MLP of
# the mlp problem (otherwise trained on first use, ~20 s) and, in benchmarks/.cache/wheels/,
# the gradsolve wheel (`pip download gradsolve==0.2.1 --no-deps -d benchmarks/.cache/wheels`),
# installed here if gradsolve is missing; without it the gradsolve method is skipped.
# On a CPU, try it with a small budget: bash benchmarks/gpu_quick.sh --budget-s 60 --out /tmp/gq
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import gradsolve" 2>/dev/null; then
    if compgen -G "benchmarks/.cache/wheels/gradsolve-*.whl" >/dev/null; then
        "$PY" -m pip install -q --no-deps --no-index benchmarks/.cache/wheels/gradsolve-*.whl ||
            echo "gradsolve wheel did not install: its method will be skipped"
    else
        echo "gradsolve not installed and no wheel in benchmarks/.cache/wheels: skipped"
    fi
fi
"$PY" -c "import jax; print('jax', jax.__version__, jax.devices())"
log=$(mktemp)
PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" "$PY" benchmarks/run.py --gpu-quick "$@" 2>&1 |
    tee "$log"
folder=$(sed -n 's/.*; results in //p' "$log" | tail -n 1)
rm -f "$log"
if [ -n "${OUT:-}" ] && [ -n "$folder" ] && [ -d "$folder" ]; then
    tar czf "$OUT/$(basename "$folder").tar.gz" -C "$(dirname "$folder")" "$(basename "$folder")"
    echo "packed $folder into $OUT/$(basename "$folder").tar.gz"
fi
