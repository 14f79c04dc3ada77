#!/usr/bin/env bash
# The one-call GPU check for the kernels (issue 4) and the engine (issue 6), sized for one device command
# (DEADLINE_S, default 560 s, for the whole script). Each part runs under its own time limit so one failure
# does not lose the rest, most wanted first:
#   1. versions and the card;
#   2. kernels_pallas.bench_gpu: the kernels lower and match the references on this card; copy bandwidth; the
#      decode kernel's defaults at the grid (batch x context, beside JAX's shipped kernel); a small
#      DecodeConfig sweep at 32 x 1K and 32 x 2K, the shapes furthest from the target on the H200;
#   3. benchmarks/engine_gpu.py: llama-3-8b (dummy bf16) through the engine's runner: decode step time and
#      MBU at batch 16/64, context 1K; prefill 2K vs matmul rate; swap bandwidth; overlapped-copy cost; the
#      whole engine loop with async scheduling on and off; a memory-pressure run that must give the same ids;
#   4. benchmarks/sim_fidelity.py --quick on llama-3-8b (the short ShareGPT fidelity run), in the time left.
# Usage (repository root): OUT=/some/dir bash benchmarks/gpu_engine_check.sh
source benchmarks/gpu_env.sh /tmp/gpu_engine_check
START=$SECONDS
left() { echo $(( ${DEADLINE_S:-560} - (SECONDS - START) )); }
echo "== kernels: correctness, copy, decode grid, sweep"
timeout "${KERNELS_S:-170}" python3 -m kernels_pallas.bench_gpu --only correctness,copy,decode,sweep \
  --sweep-shapes 32x1024,32x2048 --prefill-configs default --budget-s "$(( ${KERNELS_S:-170} - 15 ))" \
  --decode-configs "default;target_programs=256;target_programs=1024;num_warps=4;block_kv=64;block_kv=64,target_programs=1024,num_warps=4" \
  2>&1 | tail -70 | tee "$OUT/kernels.log"
echo "== engine llama-3-8b ($(left) s left)"
timeout "${ENGINE_S:-230}" python3 benchmarks/engine_gpu.py --preset llama-3-8b --dtype bfloat16 \
  --json "$OUT/engine.json" 2>&1 | grep -v "^W[0-9]" | tail -30 | tee "$OUT/engine.log"
if [ -f benchmarks/sim_fidelity.py ] && [ "$(left)" -gt 60 ]; then
  echo "== fidelity ($(left) s left)"; timeout "$(left)" python3 benchmarks/sim_fidelity.py --model llama-3-8b --dtype bfloat16 \
    --max-model-len 2048 --batch-size 16 --quick --json "$OUT/sim_fidelity.json" 2>&1 | grep -v "^W[0-9]" | tail -25 | tee "$OUT/fidelity.log"
fi
echo "== done ($(( SECONDS - START )) s)"
