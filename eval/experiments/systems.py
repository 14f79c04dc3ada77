"""The systems compared in the figures, and the scheduler configuration each gets in the artifact's setting.

A ``SystemSpec`` names a policy from the ``schedulers`` registry, the label its logs and legends use, the
server family that sizes its KV pools (``"fastserve"``: the artifact's FastServe/FastServe-FCFS server;
``"vllm"``: vLLM 0.6; see ``eval.costmodels.capacity``) and any ``SchedulerConfig`` overrides.

Swap space (host pool) per server family, from the artifact's scripts: FastServe and FastServe-FCFS get
56 GiB for ShareGPT and 48 GiB for Alpaca (``overall_*_{sharegpt,alpaca}.sh``), 32/40 GiB in the Llama-3-8B
runs (``gqa/*``); vLLM and vLLM with chunked prefill run with vLLM's default 4 GiB (preemption there is by
recompute, so the host pool is idle). The FasterTransformer baseline (``static``) keeps no host pool.
"""

from __future__ import annotations

from dataclasses import dataclass

from schedulers.config import SchedulerConfig

from ..costmodels import HardwarePreset


@dataclass(frozen=True)
class SystemSpec:
    label: str  # in log names, CSVs and the report ("fastserve", "fastserve-reactive", ...)
    policy: str  # name in the schedulers registry
    display: str  # legend text, as the paper names the system
    server: str = "fastserve"  # KV sizing rule and swap-space family: "fastserve" | "vllm" | "static"
    overrides: tuple[tuple[str, object], ...] = ()  # SchedulerConfig field overrides
    config_preset: str = "paper"  # SchedulerConfig.preset name the overrides apply to

    def __post_init__(self) -> None:
        if self.server not in ("fastserve", "vllm", "static"):
            raise ValueError(f"SystemSpec {self.label!r}: server must be fastserve, vllm or static, got {self.server!r}")


def _sys(label, policy, display, server="fastserve", preset="paper", **overrides) -> SystemSpec:
    return SystemSpec(label, policy, display, server, tuple(sorted(overrides.items())), preset)


SYSTEMS: dict[str, SystemSpec] = {
    s.label: s
    for s in (
        _sys("static", "static", "FasterTransformer", server="static"),
        _sys("vllm", "vllm", "vLLM", server="vllm"),
        _sys("cp", "cp", "vLLM-CP", server="vllm"),
        _sys("fcfs", "fcfs", "FastServe-FCFS"),
        _sys("fastserve", "fastserve", "FastServe"),
        _sys("fastserve-artifact", "fastserve", "FastServe (artifact config)", preset="artifact"),
        _sys("fastserve-nostarve", "fastserve", "FastServe (no promotion)", starvation_threshold=None),
        _sys("fastserve-aging", "fastserve", "FastServe (aging)", promotion="one_level"),
        _sys("mlfq", "mlfq", "MLFQ"),
        _sys("fixed-priority", "fixed-priority", "Fixed-priority"),
        _sys("srpt", "srpt", "SRPT (oracle)"),
        _sys("fastserve-proactive", "fastserve", "Proactive", swap_mode="proactive"),
        _sys("fastserve-reactive", "fastserve", "Reactive", swap_mode="reactive"),
        _sys("fastserve-recompute", "fastserve", "Recompute", swap_mode="recompute"),
    )
}

# Host swap space in GiB per (server family, dataset), by model family ("opt" or "llama").
SWAP_SPACE_GIB: dict[tuple[str, str, str], float] = {
    ("fastserve", "opt", "sharegpt"): 56,
    ("fastserve", "opt", "alpaca"): 48,
    ("fastserve", "llama", "sharegpt"): 32,
    ("fastserve", "llama", "alpaca"): 40,
}
VLLM_SWAP_GIB = 4
DEFAULT_FASTSERVE_SWAP_GIB = 56


def get_system(label: str) -> SystemSpec:
    if label not in SYSTEMS:
        raise ValueError(f"unknown system {label!r}; choose one of {', '.join(SYSTEMS)}")
    return SYSTEMS[label]


def swap_space_gib(system: SystemSpec, preset: HardwarePreset, dataset: str) -> float:
    """Host swap space the artifact gives ``system`` for ``dataset`` on ``preset``'s model."""
    if system.server == "static":
        return 0.0
    if system.server == "vllm":
        return VLLM_SWAP_GIB
    family = "llama" if preset.model is not None and preset.model.name.startswith("llama") else "opt"
    return SWAP_SPACE_GIB.get((system.server, family, dataset), DEFAULT_FASTSERVE_SWAP_GIB)


def scheduler_config(
    system: SystemSpec,
    preset: HardwarePreset,
    dataset: str,
    *,
    batch_size: int = 16,
    max_tokens_per_batch: int = 2048,
    max_model_len: int = 2048,
) -> SchedulerConfig:
    """The ``SchedulerConfig`` ``system`` runs with: the artifact's shared settings, its server's pool sizes,
    then its own overrides."""
    rule = "fastserve" if system.server == "fastserve" else "vllm"
    base = dict(
        block_size=preset.block_size,
        max_batch_size=batch_size,
        max_tokens_per_batch=max_tokens_per_batch,
        max_model_len=max_model_len,
        num_device_blocks=preset.device_blocks(
            rule, max_tokens_per_batch=max_tokens_per_batch, max_batch_size=batch_size
        ),
        num_host_blocks=preset.host_blocks(swap_space_gib(system, preset, dataset)),
    )
    return SchedulerConfig.preset(system.config_preset, **{**base, **dict(system.overrides)})


def device_scheduler_config(system: SystemSpec, device: HardwarePreset, dataset: str, *,
                            batch_size: int = 16) -> SchedulerConfig:
    """The ``SchedulerConfig`` ``system`` runs with on the engine that ``device`` (a ``jserve profile`` file)
    was measured on: its pools and limits (the batch size: the smaller of the two), as
    ``eval.engine_backend.engine_scheduler_config`` gives it on the engine itself. A device without recorded
    limits is a plain preset (``scheduler_config``)."""
    lim = device.limits
    if lim is None:
        return scheduler_config(system, device, dataset, batch_size=batch_size)
    config = scheduler_config(system, device, dataset, batch_size=min(batch_size, lim.max_batch_size),
                              max_tokens_per_batch=lim.max_tokens_per_batch, max_model_len=lim.max_model_len)
    return config.replace(num_host_blocks=lim.num_host_blocks)
