"""KV-cache capacity in blocks, sized the way the artifact's servers size their pools.

Device pool (``device_kv_blocks``): ``floor((utilization * M - headroom - W) / block_bytes)`` where ``M`` is the
GPU memory the CUDA runtime reports, ``W`` the weights held by one GPU and ``headroom`` what the server keeps
for activations. Two servers, two headroom rules:

* ``"fastserve"``: the public artifact's FastServe / FastServe-FCFS server (``fastserve/worker.py``,
  ``_profile_num_available_blocks``) reserves 1% of total memory: ``headroom = 0.01 * M``.
  OPT-13B on an A100-40GB: ``(0.9 - 0.01) * 42.51 GB - 25.71 GB = 12.12 GB`` -> 925 blocks of 16 tokens.
* ``"vllm"``: vLLM 0.6 runs a profiling forward pass of ``max_tokens_per_batch`` tokens and subtracts the
  measured peak (activations plus the CUDA context and library workspaces, seen through ``mem_get_info``).
  We cannot measure it here, so we estimate it: a fixed 0.5 GiB for the context and workspaces, plus
  ``tokens * (3h + h + 2f + 2h) * dtype`` bytes of live activations (QKV, attention output, the two MLP
  intermediates, two residual copies) plus fp32 logits for ``max_batch_size`` sampled rows.
  OPT-13B on an A100-40GB: 0.83 GB headroom -> 894 blocks (DESIGN.md quotes about 883; within 1.3%).

Host pool (``host_kv_blocks``): ``floor(swap_space_gib * 2**30 / block_bytes)``, as both servers compute it
(``--swap-space`` is in GiB). The artifact gives FastServe/FCFS 56 GiB for ShareGPT and 48 GiB for Alpaca
(4587 and 3932 OPT-13B blocks) and vLLM its default 4 GiB (327 blocks).
"""

from __future__ import annotations

from .specs import GiB, GPUSpec, ModelSpec

SIZING_RULES = ("fastserve", "vllm")
CUDA_CONTEXT_BYTES = GiB // 2


def activation_headroom_bytes(
    model: ModelSpec,
    gpu: GPUSpec,
    rule: str,
    *,
    tp: int = 1,
    max_tokens_per_batch: int = 2048,
    max_batch_size: int = 16,
) -> int:
    """Bytes a server keeps free of weights and KV on each GPU, by ``rule`` (see the module docstring)."""
    if rule == "fastserve":
        return int(0.01 * gpu.memory_bytes)
    if rule == "vllm":
        h, f = model.hidden_size, model.intermediate_size
        per_token = (3 * h + h + 2 * f + 2 * h) * model.dtype_bytes // tp
        logits = max_batch_size * model.vocab_size * 4
        return CUDA_CONTEXT_BYTES + max_tokens_per_batch * per_token + logits
    raise ValueError(f"unknown KV sizing rule {rule!r}; choose one of {', '.join(SIZING_RULES)}")


def device_kv_blocks(
    model: ModelSpec,
    gpu: GPUSpec,
    *,
    rule: str = "fastserve",
    tp: int = 1,
    block_size: int = 16,
    gpu_memory_utilization: float = 0.9,
    max_tokens_per_batch: int = 2048,
    max_batch_size: int = 16,
) -> int:
    """Device KV blocks per GPU shard (every shard holds the same logical blocks under tensor parallelism)."""
    if not 0 < gpu_memory_utilization <= 1:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization!r}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size!r}")
    headroom = activation_headroom_bytes(
        model, gpu, rule, tp=tp, max_tokens_per_batch=max_tokens_per_batch, max_batch_size=max_batch_size
    )
    free = gpu_memory_utilization * gpu.memory_bytes - headroom - model.weight_bytes / tp
    block_bytes = model.kv_block_bytes(block_size) / tp
    if free <= 0:
        raise ValueError(
            f"{model.name} does not fit on {tp} x {gpu.name}: {model.weight_bytes / tp / 1e9:.1f} GB of weights per "
            f"GPU and {headroom / 1e9:.1f} GB of activations (batches of {max_batch_size} sequences, "
            f"{max_tokens_per_batch} tokens) leave no room for KV blocks at {gpu_memory_utilization:.0%} utilization"
        )
    blocks = int(free // block_bytes)
    if blocks < 1:
        raise ValueError(
            f"{model.name} on {tp} x {gpu.name}: the {free / 1e9:.1f} GB per GPU left for the KV cache hold no block "
            f"of {block_size} tokens ({block_bytes / 1e9:.3g} GB per GPU); use a smaller block_size"
        )
    return blocks


def host_kv_blocks(model: ModelSpec, swap_space_gib: float, *, tp: int = 1, block_size: int = 16) -> int:
    """Host (swap) KV blocks for ``swap_space_gib`` GiB per GPU of pinned host memory."""
    if not swap_space_gib >= 0:
        raise ValueError(f"swap space must be >= 0 GiB, got {swap_space_gib!r}")
    return int(swap_space_gib * GiB // (model.kv_block_bytes(block_size) / tp))
