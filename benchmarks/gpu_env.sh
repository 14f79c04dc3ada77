# Sourced by the one-call GPU checks (benchmarks/gpu_check.sh, benchmarks/gpu_engine_check.sh): environment,
# the output folder ($OUT, default $1), the card, and flax from a carried wheel when the device image's flax
# predates nnx.List (.whl/, see docs/kernels.md).
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-$1}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
if ! python3 -c "from flax import nnx; nnx.List" 2>/dev/null && ls .whl/flax-*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/flax-*.whl && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
python3 -c "import sys, jax, flax; print('python', sys.version.split()[0], 'jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
