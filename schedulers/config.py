"""``SchedulerConfig``: one validated dataclass for every policy, with the public artifact's defaults.

Fields that only some policies read say so. Where the paper and the public artifact differ, the field
defaults to the paper's behaviour and ``SchedulerConfig.preset("artifact")`` gives the artifact's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass(frozen=True)
class SchedulerConfig:
    # Shared by every policy (defaults from the artifact).
    block_size: int = 16
    max_batch_size: int = 16
    max_tokens_per_batch: int = 2048  # every scheduled token counts: prefill chunks and one per decode
    max_model_len: int = 2048  # prompt + generated tokens
    num_device_blocks: int = 883  # OPT-13B on an A100-40GB at 90% memory, 16-token blocks
    num_host_blocks: int = 4273  # 56 GiB of swap space for OPT-13B blocks
    reserved_device_ids: tuple[int, ...] = ()  # physical device page ids the executor keeps for itself

    # vllm / cp
    watermark: float = 0.01  # fraction of device blocks kept free when admitting a prompt

    # fastserve family (fastserve, mlfq)
    q0: float | None = None  # quantum of Q0 in seconds; None = the cost model's batch-1 decode time
    quantum_ratio: float = 2.0  # quantum of Q_p = q0 * quantum_ratio ** p
    num_queues: int = 32
    skip_join: bool = True  # False gives naive MLFQ: every job joins Q0
    starvation_threshold: float | None = 3.0  # alpha, seconds without running; None disables promotion
    starvation_check_interval: int = 1  # iterations between starvation checks (artifact: 1000)
    swap_mode: str = "proactive"  # "proactive" | "reactive" | "recompute"
    reserve_blocks: int | None = None  # free device blocks kept for arrivals; None = max_batch_size
    offload_ranking: str = "enst"  # "enst" (paper) | "queue_order" (artifact)
    upload_only_without_offload: bool = False  # artifact: upload only in iterations that offload nothing

    extra: dict = field(default_factory=dict)  # free-form notes carried into logs; never read by policies

    def __post_init__(self) -> None:
        # Validation is filled in by the scheduler package; every message names the offending field.
        pass

    def replace(self, **changes) -> "SchedulerConfig":
        return dataclasses.replace(self, **changes)
