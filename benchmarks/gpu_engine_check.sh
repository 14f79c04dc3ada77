#!/usr/bin/env bash
# The one-call GPU check for the engine (issue 6) and the kernels (issue 4), sized for one device command
# (DEADLINE_S, default 560 s, for the whole script). Each part runs under its own time limit so one failure
# does not lose the rest, most wanted first:
#   1. versions and the card;
#   2. benchmarks/engine_loop_phases.py: Llama-3-8B (dummy bf16) decode at batch 16/64, context 1K, through
#      LLMEngine.step() with async scheduling on and off, beside the device-bound step time and the host time
#      of one launch, for the GPU's branch-free step (skip_idle_work off): does the async loop reach the
#      device-bound time now that fed tokens stay on the device? Then the same with XLA's command buffers
#      (CUDA graphs) off: launching one step held the host 3.2-8 ms on the H100 — is that the graphs'
#      per-launch update (new argument addresses every step) or the kernel launches themselves? Each run
#      prints the step's ENTRY ops (kernels, cuBLAS and Triton calls, command-buffer calls).
#   3. benchmarks/engine_gpu.py: decode step time and MBU through the runner; prefill 2K vs matmul rate; swap
#      bandwidth; overlapped-copy cost; the engine loop; a memory-pressure run;
#   4. kernels_pallas.bench_gpu: the kernels lower and match the references on this card; copy bandwidth (the
#      decode grid met its target on the H100 on 2026-11-27: docs/kernels.md);
#   5. benchmarks/sim_fidelity.py --quick on llama-3-8b (the short ShareGPT fidelity run), in the time left.
# Usage (repository root): OUT=/some/dir bash benchmarks/gpu_engine_check.sh
source benchmarks/gpu_env.sh /tmp/gpu_engine_check
START=$SECONDS
left() { echo $(( ${DEADLINE_S:-560} - (SECONDS - START) )); }
echo "== engine loop phases"
timeout "${PHASES_S:-120}" python3 benchmarks/engine_loop_phases.py --preset llama-3-8b --dtype bfloat16 \
  --skip-idle-work off --json "$OUT/phases.json" 2>&1 | grep -v "^W[0-9]" | tail -25 | tee "$OUT/phases.log"
echo "== engine loop phases, XLA command buffers off ($(left) s left)"
XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=" timeout "${PHASES_CB_S:-90}" python3 \
  benchmarks/engine_loop_phases.py --preset llama-3-8b --dtype bfloat16 --skip-idle-work off --rounds 1 \
  --json "$OUT/phases_no_command_buffers.json" 2>&1 | grep -v "^W[0-9]" | tail -25 | tee "$OUT/phases_no_cb.log"
echo "== engine llama-3-8b ($(left) s left)"
timeout "${ENGINE_S:-150}" python3 benchmarks/engine_gpu.py --preset llama-3-8b --dtype bfloat16 \
  --json "$OUT/engine.json" 2>&1 | grep -v "^W[0-9]" | tail -30 | tee "$OUT/engine.log"
echo "== kernels: correctness, copy ($(left) s left)"
timeout "${KERNELS_S:-70}" python3 -m kernels_pallas.bench_gpu --only correctness,copy \
  --budget-s "$(( ${KERNELS_S:-70} - 15 ))" 2>&1 | tail -40 | tee "$OUT/kernels.log"
if [ -f benchmarks/sim_fidelity.py ] && [ "$(left)" -gt 60 ]; then
  echo "== fidelity ($(left) s left)"; timeout "$(left)" python3 benchmarks/sim_fidelity.py --model llama-3-8b --dtype bfloat16 \
    --max-model-len 2048 --batch-size 16 --quick --json "$OUT/sim_fidelity.json" 2>&1 | grep -v "^W[0-9]" | tail -25 | tee "$OUT/fidelity.log"
fi
echo "== done ($(( SECONDS - START )) s)"
