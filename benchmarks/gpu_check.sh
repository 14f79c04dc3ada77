#!/usr/bin/env bash
# The one-call GPU check (device machine: one H100/H200, jax with CUDA, no package registry).
# Runs, each under its own time limit so one failure does not lose the rest:
#   1. versions and the card;
#   2. kernels_pallas.bench_gpu: kernel lowering + correctness against the references, copy bandwidth,
#      decode attention at Llama-3-8B shapes vs JAX's shipped kernel, prefill TFLOP/s, KV write;
#   3. benchmarks/model_step.py: llama-3-8b (dummy bf16 weights) decode/prefill step times and MBU;
#   4. the Hugging Face parity tests of tests/jserve through the real Pallas kernels.
# Usage (repository root): OUT=/some/dir bash benchmarks/gpu_check.sh
source benchmarks/gpu_env.sh /tmp/gpu_check
echo "== kernels"; timeout "${KERNELS_S:-200}" python3 -m kernels_pallas.bench_gpu --budget-s "${KERNELS_BUDGET_S:-170}" 2>&1 | tee "$OUT/kernels.log"
echo "== model step"; timeout "${MODEL_S:-160}" python3 benchmarks/model_step.py --preset llama-3-8b --dtype bfloat16 \
  --batches 16,64 --contexts 1024,2048 --prefill 2048 --json "$OUT/model_step.json" 2>&1 | tee "$OUT/model_step.log"
echo "== parity"; timeout "${PARITY_S:-90}" python3 -m pytest -q -x -p no:cacheprovider tests/jserve/test_models_hf_parity.py 2>&1 | tail -40 | tee "$OUT/parity.log"
echo "== done"
