#!/usr/bin/env bash
# The one-call GPU check for the engine (issue 6) and the decode-kernel tuning left from issue 4.
# Each part runs under its own time limit so one failure does not lose the rest:
#   1. versions and the card;
#   2. benchmarks/engine_gpu.py: llama-3-8b (dummy bf16) through the engine's runner: decode step time and
#      MBU at batch 16/64, context 1K; prefill 2K vs matmul rate; swap bandwidth; overlapped-copy cost;
#      a memory-pressure run that must give the same greedy ids;
#   3. kernels_pallas.bench_gpu: the decode kernel's defaults re-timed at the grid (batch x context,
#      beside JAX's shipped kernel), then a DecodeConfig sweep at 32 x 1K, the one shape still under 70%;
#   4. benchmarks/sim_fidelity.py --quick on llama-3-8b (the short ShareGPT fidelity run).
# Usage (repository root): OUT=/some/dir bash benchmarks/gpu_engine_check.sh
source benchmarks/gpu_env.sh /tmp/gpu_engine_check
echo "== engine llama-3-8b"; timeout "${ENGINE_S:-270}" python3 benchmarks/engine_gpu.py --preset llama-3-8b --dtype bfloat16 \
  --json "$OUT/engine.json" 2>&1 | tail -30 | tee "$OUT/engine.log"
echo "== decode defaults + sweep"; timeout "${SWEEP_S:-150}" python3 -m kernels_pallas.bench_gpu --only copy,decode,sweep \
  --sweep-shapes 32x1024 --prefill-configs default --budget-s 140 \
  --decode-configs "default;target_programs=256;target_programs=1024;num_warps=4;target_programs=256,num_warps=1;block_kv=16;block_kv=64" \
  2>&1 | tail -60 | tee "$OUT/sweep.log"
if [ -f benchmarks/sim_fidelity.py ]; then
  echo "== fidelity"; timeout "${FIDELITY_S:-150}" python3 benchmarks/sim_fidelity.py --model llama-3-8b --dtype bfloat16 \
    --max-model-len 2048 --batch-size 16 --quick --json "$OUT/sim_fidelity.json" 2>&1 | tail -25 | tee "$OUT/fidelity.log"
fi
echo "== done"
