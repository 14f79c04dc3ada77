"""``EngineConfig`` (the engine's limits, shapes and memory settings, validated when built) and the sizes of
the KV pools they give: the device pool (an explicit ``num_device_blocks`` is checked against the free memory
before anything is allocated; left None, it is sized from that memory) and the host pool (checked against
the machine's memory).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

from schedulers import IterationCostModel, SchedulerConfig, available_policies

from .kv_cache import KVCacheSpec
from .sampling import _is_int, _is_real

__all__ = ["EngineConfig", "device_pages", "host_pages", "resolve_max_model_len"]

DEFAULT_MAX_BATCH_SIZE = 32  # EngineConfig.max_batch_size without it or decode_buckets
DEFAULT_MAX_TOKENS_PER_BATCH = 2048  # EngineConfig.max_tokens_per_batch without it or token_buckets
DEFAULT_MAX_MODEL_LEN = 4096  # EngineConfig.max_model_len without it: at most this, at most the model's context


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Engine limits and memory. Block counts left None are sized from memory:

    * device pages: ``gpu_memory_utilization`` of the accelerator's memory minus what is already in use
      (weights), or ``cpu_kv_cache_gib`` on a CPU; ``num_device_blocks`` overrides (it counts the one
      reserved padding page too);
    * host pages: ``swap_space_gib`` of ``pinned_host`` memory; ``num_host_blocks`` overrides.
    """

    scheduler: str = "fastserve"
    scheduler_config: SchedulerConfig | None = None  # policy fields; the limits below override its own
    cost_model: object | None = None  # schedulers.cost.IterationCostModel for the policy's predictions
    page_size: int = 16
    # The step limits. Left None, each follows its explicit buckets: max_batch_size the largest of
    # decode_buckets (else 32), max_tokens_per_batch the largest of token_buckets (else 2048). Given both, the
    # buckets must fit the limit (see __post_init__). After construction both are ints.
    max_batch_size: int | None = None
    max_tokens_per_batch: int | None = None
    max_model_len: int | None = None  # default: min(model context, 4096); see resolve_max_model_len
    num_device_blocks: int | None = None
    num_host_blocks: int | None = None
    gpu_memory_utilization: float = 0.9
    cpu_kv_cache_gib: float = 1.0
    swap_space_gib: float = 4.0
    decode_buckets: tuple[int, ...] = ()
    token_buckets: tuple[int, ...] = ()
    swap_buckets: tuple[int, ...] = ()
    progress: bool = True  # progress bar while compiling
    # Schedule and pack iteration n+1 while the device runs iteration n (see the module docstring); False
    # runs one iteration per step() call, start to finish. None: on for accelerators, off on a CPU (there the
    # "device" is the host's own cores, so host work has nothing to hide behind).
    async_scheduling: bool | None = None
    # Rows of the device's penalty tables (vocab_size * 5 bytes each; SamplingParams.presence/frequency/
    # repetition_penalty): at least max_batch_size, one per row of a step. They cache the state of requests
    # outside the step too; a request whose row was reused rebuilds it from its token ids when it runs again
    # (jserve/engine/penalties.py). None: max_batch_size.
    max_penalty_requests: int | None = None
    # Skip sampling work no row of a batch needs (the sort and draw of an all-greedy batch, log-probabilities,
    # penalties) with run-time branches. None: on a CPU only; on a GPU each such branch makes the thread that
    # dispatches the step wait for the device (see jserve/engine/sampling.py), so there every step computes
    # every part and selects per row.
    skip_idle_work: bool | None = None
    # Serve SamplingParams.prompt_logprobs: steps also return their hidden states and one more executable per
    # position bucket (64, 128, ...) is compiled at start-up. Off: requests that ask are refused.
    enable_prompt_logprobs: bool = False
    # Prefix caching: a request whose prompt starts like an earlier one's reuses the KV pages of their common
    # full pages instead of computing them (schedulers/blocks.py; requests asking for prompt_logprobs neither
    # use nor fill the cache). Off by default so that the paper's experiments measure the policies alone.
    enable_prefix_caching: bool = False

    def __post_init__(self) -> None:
        for name in ("decode_buckets", "token_buckets", "swap_buckets"):
            v = getattr(self, name)
            if not isinstance(v, (tuple, list)) or not all(_is_int(b) and b >= 1 for b in v):
                raise ValueError(f"EngineConfig.{name} must be a list of ints >= 1 (empty: the defaults), got {v!r}")
            object.__setattr__(self, name, tuple(int(b) for b in v))
        for name in ("page_size", "max_batch_size", "max_tokens_per_batch"):
            v = getattr(self, name)
            if name != "page_size" and v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"EngineConfig.{name} must be an int >= 1, got {v!r}")
        self._resolve_step_limits()
        for name, low in (("max_model_len", 2), ("num_device_blocks", 2), ("num_host_blocks", 0),
                          ("max_penalty_requests", 1)):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < low):
                raise ValueError(f"EngineConfig.{name} must be None or an int >= {low}, got {v!r}")
        if not _is_real(self.gpu_memory_utilization) or not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"EngineConfig.gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")
        for name in ("cpu_kv_cache_gib", "swap_space_gib"):
            v = getattr(self, name)
            if not _is_real(v) or not math.isfinite(v) or v < 0:
                raise ValueError(f"EngineConfig.{name} must be a finite number >= 0, got {v!r}")
        for name in ("async_scheduling", "skip_idle_work"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, bool):
                raise ValueError(f"EngineConfig.{name} must be None or a bool, got {v!r}")
        for name in ("enable_prompt_logprobs", "enable_prefix_caching"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"EngineConfig.{name} must be a bool, got {getattr(self, name)!r}")
        known = available_policies()  # built-in and registered (schedulers.register_policy)
        if self.scheduler not in known:  # before the model loads and the steps compile
            raise ValueError(f"unknown scheduler policy {self.scheduler!r}; known policies: {', '.join(known)}")
        if self.cost_model is not None and not isinstance(self.cost_model, IterationCostModel):
            raise ValueError("EngineConfig.cost_model must be None, an IterationCostModel or (for LLM) the path of a "
                             f"cost profile, got {type(self.cost_model).__name__}")
        if self.max_penalty_requests is not None and self.max_penalty_requests < self.max_batch_size:
            raise ValueError(
                f"EngineConfig.max_penalty_requests ({self.max_penalty_requests}) must be >= max_batch_size "
                f"({self.max_batch_size}): every row of a step may need a penalty slot"
            )

    def _resolve_step_limits(self) -> None:
        """Fill ``max_batch_size`` / ``max_tokens_per_batch`` left None from their buckets (or the defaults) and
        check the buckets against the limits (``check_step_buckets``), before anything loads or compiles."""
        decode, tokens = self.decode_buckets, self.token_buckets
        batch_from = tokens_from = ""
        if self.max_batch_size is None:
            object.__setattr__(self, "max_batch_size", max(decode) if decode else DEFAULT_MAX_BATCH_SIZE)
            batch_from = ", the largest of decode_buckets" if decode else ""
        if self.max_tokens_per_batch is None:
            object.__setattr__(self, "max_tokens_per_batch", max(tokens) if tokens else DEFAULT_MAX_TOKENS_PER_BATCH)
            tokens_from = ", the largest of token_buckets" if tokens else ""
        batch, budget = self.max_batch_size, self.max_tokens_per_batch
        try:
            check_step_buckets(decode, tokens, batch, budget, limits_follow_buckets=True)
        except ValueError as e:
            raise ValueError(f"EngineConfig.{e}") from None
        if budget < batch:
            raise ValueError(
                f"EngineConfig.max_tokens_per_batch ({budget}{tokens_from}) must be >= max_batch_size "
                f"({batch}{batch_from}): every decode in a full batch needs one token"
            )


def check_step_buckets(decode: Sequence[int], tokens: Sequence[int], max_batch_size: int, max_tokens_per_batch: int,
                       *, limits_follow_buckets: bool = False) -> None:
    """The step buckets against the step limits (``EngineConfig`` before anything loads, ``RunnerConfig.resolved``
    before anything compiles; an empty bucket list is not checked): the largest decode bucket must be
    ``max_batch_size`` (a smaller one leaves full decode steps no shape; a larger one cannot compile: a step's
    outputs have ``max_batch_size`` rows); the largest token bucket must be at least ``max_tokens_per_batch``
    (larger ones compile but no step uses them). ``limits_follow_buckets``: the error says how a limit left
    unset would follow its buckets (``EngineConfig``'s rule)."""
    batch, budget = max_batch_size, max_tokens_per_batch

    def follow(field: str, kind: str) -> str:
        return f", or leave {field} unset to follow the largest {kind} bucket" if limits_follow_buckets else ""

    if decode and max(decode) < batch:
        raise ValueError(
            f"decode_buckets {tuple(decode)} do not cover max_batch_size={batch}: a decode step of {batch} sequences "
            f"would have no shape (make {batch} a decode bucket{follow('max_batch_size', 'decode')})")
    if decode and max(decode) > batch:
        raise ValueError(
            f"decode_buckets {tuple(decode)} go above max_batch_size={batch}: a step holds at most max_batch_size "
            f"sequences, so a larger decode bucket cannot compile (drop the buckets above {batch}"
            f"{follow('max_batch_size', 'decode')})")
    if tokens and max(tokens) < budget:
        raise ValueError(
            f"token_buckets {tuple(tokens)} do not cover max_tokens_per_batch={budget}: a step of {budget} tokens "
            f"would have no shape (give a token bucket >= {budget}{follow('max_tokens_per_batch', 'token')})")


def resolve_max_model_len(max_model_len: int | None, model_config) -> int:
    """``EngineConfig.max_model_len`` against a ``ModelConfig``: None gives the model's context
    (``max_position_embeddings``) up to ``DEFAULT_MAX_MODEL_LEN``; a larger explicit value is refused. A model
    with sliding-window attention has its context capped at the window (jserve computes full attention, exact
    only within the window; ``ModelConfig.sliding_window``), and the refusal names ``sliding_window``."""
    context = model_config.max_position_embeddings
    if max_model_len is None:
        return min(context, DEFAULT_MAX_MODEL_LEN)
    if max_model_len > context:
        window = model_config.sliding_window
        if window is not None and window <= context:
            raise ValueError(
                f"max_model_len {max_model_len} exceeds the model's sliding_window {window}: jserve computes full "
                f"attention, which equals the model's sliding-window attention only for sequences of at most "
                f"{window} tokens, so the model's context is {window} (give max_model_len <= {window})"
            )
        raise ValueError(f"max_model_len {max_model_len} exceeds the model's context {context}")
    return max_model_len


def _meminfo_bytes(field: str) -> int | None:
    """A ``/proc/meminfo`` field (``MemAvailable``, ``MemTotal``) in bytes; None where there is none."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _available_memory_bytes() -> int | None:
    return _meminfo_bytes("MemAvailable")


def host_pages(cfg: EngineConfig, spec: KVCacheSpec) -> int:
    """The host pool's page count: ``num_host_blocks``, or ``swap_space_gib`` of pages. One larger than the
    machine's memory is refused: it could never be filled (host pages are allocated as swap-outs need them),
    and the scheduler's bookkeeping of that many pages alone can exhaust the memory."""
    if cfg.num_host_blocks is not None:
        pages, asked = cfg.num_host_blocks, f"num_host_blocks={cfg.num_host_blocks}"
    else:
        pages, asked = int(cfg.swap_space_gib * 2**30 // spec.page_bytes), f"swap_space_gib={cfg.swap_space_gib}"
    total = _meminfo_bytes("MemTotal")
    if total is not None and pages * spec.page_bytes > total:
        raise ValueError(f"{asked} asks for {pages * spec.page_bytes / 2**30:.1f} GiB of host memory; this machine "
                         f"has {total / 2**30:.1f} GiB")
    return pages


def _accelerator_memory(device) -> tuple[int, int] | None:
    """(bytes limit, bytes in use) of an accelerator's memory; None where the device reports none (a CPU)."""
    try:
        stats = device.memory_stats()
    except Exception:
        stats = None
    if stats and stats.get("bytes_limit"):
        return stats["bytes_limit"], stats.get("bytes_in_use", 0)
    return None


def _free_bytes(device) -> int | None:
    """Memory a KV pool may take on ``device``: the accelerator's limit minus what is in use, or the host's
    available memory on a CPU; None when unknown."""
    acc = _accelerator_memory(device)
    return acc[0] - acc[1] if acc else _available_memory_bytes()


def device_pages(cfg: EngineConfig, spec: KVCacheSpec, max_model_len: int, device, reserved_bytes: int = 0,
                 reserved_by: str = "other device state") -> int:
    """The device pool's page count (the reserved padding page included). An explicit ``num_device_blocks``
    larger than the free memory is refused before it is allocated (a CPU would otherwise overcommit and be
    killed when warm-up touches the pages). Otherwise: ``gpu_memory_utilization`` of the accelerator's memory
    minus what is in use, or ``cpu_kv_cache_gib`` (at most half the available memory) on a CPU.
    ``reserved_bytes``: other device state the engine allocates after the pool (the penalty tables), taken
    from the free memory / the accelerator's budget first; more than the free memory is refused naming
    ``reserved_by`` (what asked for it)."""
    free = _free_bytes(device)
    if free is not None and reserved_bytes > free:
        raise ValueError(f"{reserved_by} needs {reserved_bytes / 2**30:.1f} GiB of device memory; the "
                         f"{device.platform} has {free / 2**30:.1f} GiB free")
    if cfg.num_device_blocks is not None:
        free = None if free is None else free - reserved_bytes
        need = cfg.num_device_blocks * spec.page_bytes
        if free is not None and need > free:
            raise ValueError(
                f"num_device_blocks={cfg.num_device_blocks} needs {need / 2**30:.1f} GiB of KV cache "
                f"({spec.page_bytes} bytes a page); the {device.platform} has {free / 2**30:.1f} GiB free"
            )
        return cfg.num_device_blocks
    acc = _accelerator_memory(device)
    if acc:
        budget = acc[0] * cfg.gpu_memory_utilization - acc[1] - reserved_bytes
    else:
        budget = cfg.cpu_kv_cache_gib * 2**30
        avail = _available_memory_bytes()
        if avail is not None:
            budget = min(budget, 0.5 * avail)
    pages = int(budget // spec.page_bytes)
    need = -(-max_model_len // cfg.page_size) + 1
    if pages < need:
        raise ValueError(
            f"KV cache budget of {budget / 2**20:.0f} MiB holds {pages} pages of {spec.page_bytes} bytes; one "
            f"request of max_model_len={max_model_len} needs {need}. Lower max_model_len or give "
            "num_device_blocks / more memory"
        )
    return pages
