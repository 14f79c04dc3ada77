"""``SchedulerConfig``: one validated dataclass for every policy, with the public artifact's defaults.

Fields that only some policies read say so. Where the paper and the public artifact differ, the field
defaults to the paper's behaviour and ``SchedulerConfig.preset("artifact")`` gives the artifact's:

=============================  =====================================  ======================================
field                          paper (default)                        ``preset("artifact")``
=============================  =====================================  ======================================
``q0``                         None: the cost model's batch-1 decode  0.010 s
``starvation_threshold``       3.0 s                                  3.0 s
``starvation_check_interval``  1 (every iteration)                    1000 iterations
``promotion``                  ``"to_top"`` (``"one_level"``: aging)  ``"to_top"``
``offload_ranking``            ``"enst"``                             ``"queue_order"``
``upload_only_without_offload`` False                                 True
``reserve_blocks``             None: ``max_batch_size`` blocks        None: ``max_batch_size`` blocks
``reserve_window``             1.0 s: reserve sized from bursts       None: the fixed reserve
``swap_overlap_factor``        1.0 (jserve's anti-thrash budget)      None (unlimited)
=============================  =====================================  ======================================

Every invalid value raises ``ValueError`` naming the field. ``docs/schedulers.md`` explains each field.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, field

MAX_COUNT = 2**62  # the largest count or pool size: every count stays a machine integer (len() of a pool is one)
MAX_QUEUES = 1024  # fastserve keeps per-level lists and walks them every step (ENST): levels, not a pool size


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
    # What a starved job gets: "to_top" (paper and artifact: promoted to Q0) or "one_level" (aging: one
    # level up per ``starvation_threshold`` without running).
    promotion: str = "to_top"
    swap_mode: str = "proactive"  # "proactive" | "reactive" | "recompute"
    reserve_blocks: int | None = None  # free device blocks kept for arrivals; None = max_batch_size
    # Paper: size the reserve from arrival bursts (schedulers/reserve.py): the most prompt blocks that arrived
    # within any ``reserve_window`` seconds of the last ``reserve_history`` seconds, at least ``reserve_blocks``
    # and at most ``reserve_cap_fraction`` of the usable device pool. None = the fixed reserve (artifact).
    reserve_window: float | None = 1.0
    reserve_history: float = 10.0
    reserve_cap_fraction: float = 0.1
    offload_ranking: str = "enst"  # "enst" (paper) | "queue_order" (artifact)
    upload_only_without_offload: bool = False  # artifact: upload only in iterations that offload nothing
    # Proactive copies (offload, upload, prefetch) of one step are limited to what the step's estimated
    # compute time hides, times this factor; None = unlimited (the artifact). Copies that a blocked
    # higher-priority job needs are never limited. See docs/schedulers.md ("thrashing").
    swap_overlap_factor: float | None = 1.0
    # Speculative uploads (host jobs not needed by the next batch) only while this many device blocks stay
    # free beyond the reserve: hysteresis between offload and upload. None = max_batch_size.
    upload_margin_blocks: int | None = None

    extra: dict = field(default_factory=dict)  # free-form notes carried into logs; never read by policies

    def __post_init__(self) -> None:
        _check_int(self, "block_size", 1)
        _check_int(self, "max_batch_size", 1)
        _check_int(self, "max_tokens_per_batch", 1)
        _check_int(self, "max_model_len", 1)
        _check_int(self, "num_device_blocks", 1)
        _check_int(self, "num_host_blocks", 0)
        _check_int(self, "num_queues", 1, MAX_QUEUES)
        _check_int(self, "starvation_check_interval", 1)
        if self.max_tokens_per_batch < self.max_batch_size:
            raise ValueError(
                f"SchedulerConfig.max_tokens_per_batch ({self.max_tokens_per_batch}) must be >= max_batch_size "
                f"({self.max_batch_size}): every decode in a full batch needs one token"
            )
        if isinstance(self.reserved_device_ids, (list, range)):  # accept any sequence, store a tuple
            object.__setattr__(self, "reserved_device_ids", tuple(self.reserved_device_ids))
        if not isinstance(self.reserved_device_ids, tuple):
            raise ValueError(
                f"SchedulerConfig.reserved_device_ids must be a tuple of ints, got {type(self.reserved_device_ids).__name__}"
            )
        for rid in self.reserved_device_ids:
            if isinstance(rid, bool) or not isinstance(rid, int) or not 0 <= rid < self.num_device_blocks:
                raise ValueError(
                    f"SchedulerConfig.reserved_device_ids: {rid!r} is not a device page id in [0, {self.num_device_blocks})"
                )
        if len(set(self.reserved_device_ids)) != len(self.reserved_device_ids):
            raise ValueError(f"SchedulerConfig.reserved_device_ids has duplicates: {self.reserved_device_ids!r}")
        if len(self.reserved_device_ids) >= self.num_device_blocks:
            raise ValueError("SchedulerConfig.reserved_device_ids leave no usable device block")
        _check_real(self, "watermark", low=0.0, high=1.0, high_open=True)
        if self.q0 is not None:
            _check_real(self, "q0", low=0.0, low_open=True)
        _check_real(self, "quantum_ratio", low=1.0)
        # The last level's quantum, q0 * quantum_ratio ** (num_queues - 1), must be a float (fastserve builds
        # them all); without q0 the cost model's decode time (milliseconds) stands in, which fastserve checks.
        top = (self.num_queues - 1) * math.log(self.quantum_ratio) + (0.0 if self.q0 is None else math.log(self.q0))
        if top >= _LOG_MAX_FLOAT:
            raise ValueError(
                f"SchedulerConfig.num_queues={self.num_queues} with quantum_ratio={self.quantum_ratio!r}"
                f"{'' if self.q0 is None else f' and q0={self.q0!r}'}: the last level's quantum, q0 * quantum_ratio "
                f"** (num_queues - 1), overflows a float; lower num_queues or quantum_ratio"
            )
        if self.starvation_threshold is not None:
            _check_real(self, "starvation_threshold", low=0.0, low_open=True)
        if self.swap_overlap_factor is not None:
            _check_real(self, "swap_overlap_factor", low=0.0)
        if self.swap_mode not in SWAP_MODES:
            raise ValueError(f"SchedulerConfig.swap_mode must be one of {SWAP_MODES}, got {self.swap_mode!r}")
        if self.promotion not in PROMOTIONS:
            raise ValueError(f"SchedulerConfig.promotion must be one of {PROMOTIONS}, got {self.promotion!r}")
        if self.offload_ranking not in OFFLOAD_RANKINGS:
            raise ValueError(
                f"SchedulerConfig.offload_ranking must be one of {OFFLOAD_RANKINGS}, got {self.offload_ranking!r}"
            )
        for name in ("skip_join", "upload_only_without_offload"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"SchedulerConfig.{name} must be a bool, got {getattr(self, name)!r}")
        # Free-block targets above the usable device pool can never be met: proactive policies would offload
        # every idle job every step. (None, the default, follows max_batch_size.)
        usable = self.num_device_blocks - len(self.reserved_device_ids)
        if self.reserve_blocks is not None:
            _check_int(self, "reserve_blocks", 0, usable, _USABLE)
        if self.upload_margin_blocks is not None:
            _check_int(self, "upload_margin_blocks", 0, usable, _USABLE)
        if self.reserve_window is not None and not (_is_real(self.reserve_window) and self.reserve_window > 0):
            raise ValueError(f"SchedulerConfig.reserve_window must be > 0 seconds or None, got {self.reserve_window!r}")
        if not (_is_real(self.reserve_history) and self.reserve_history > 0):
            raise ValueError(f"SchedulerConfig.reserve_history must be > 0 seconds, got {self.reserve_history!r}")
        if self.reserve_window is not None and self.reserve_history < self.reserve_window:
            raise ValueError(
                f"SchedulerConfig.reserve_history ({self.reserve_history}) must be >= reserve_window "
                f"({self.reserve_window})"
            )
        if not (_is_real(self.reserve_cap_fraction) and 0 <= self.reserve_cap_fraction <= 1):
            raise ValueError(
                f"SchedulerConfig.reserve_cap_fraction must be in [0, 1], got {self.reserve_cap_fraction!r}"
            )
        if not isinstance(self.extra, dict):
            raise ValueError(f"SchedulerConfig.extra must be a dict, got {type(self.extra).__name__}")

    def replace(self, **changes) -> "SchedulerConfig":
        return dataclasses.replace(self, **changes)

    # Derived values.

    @property
    def effective_reserve_blocks(self) -> int:
        """Free device blocks proactive policies keep for arrivals (``reserve_blocks`` or ``max_batch_size``)."""
        return self.max_batch_size if self.reserve_blocks is None else self.reserve_blocks

    @property
    def effective_upload_margin_blocks(self) -> int:
        return self.max_batch_size if self.upload_margin_blocks is None else self.upload_margin_blocks

    @classmethod
    def preset(cls, name: str, **overrides) -> "SchedulerConfig":
        """A named configuration, with ``overrides`` applied: ``"paper"`` (the defaults) or ``"artifact"``."""
        if name not in PRESETS:
            raise ValueError(f"unknown SchedulerConfig preset {name!r}; known: {sorted(PRESETS)}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise ValueError(f"unknown scheduler option(s) {unknown}; SchedulerConfig fields: {sorted(fields)}")
        return cls(**{**PRESETS[name], **overrides})


SWAP_MODES = ("proactive", "reactive", "recompute")
OFFLOAD_RANKINGS = ("enst", "queue_order")
PROMOTIONS = ("to_top", "one_level")

PRESETS: dict[str, dict] = {
    "paper": {},
    "artifact": dict(
        q0=0.010,
        starvation_threshold=3.0,
        starvation_check_interval=1000,
        offload_ranking="queue_order",
        upload_only_without_offload=True,
        reserve_blocks=None,
        reserve_window=None,
        swap_overlap_factor=None,
    ),
}


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


_LOG_MAX_FLOAT = math.log(sys.float_info.max)
_USABLE = " (at most the usable device blocks: num_device_blocks less the reserved_device_ids)"


def _show(value: object) -> str:
    """``repr(value)``, except for an int too long to print (repr refuses past 4300 digits) or to read."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**30:
        return f"an int of about 10**{int(value.bit_length() * 0.30103)}"
    return repr(value)


def _check_int(cfg: SchedulerConfig, name: str, low: int, high: int = MAX_COUNT, why: str = "") -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        top = "2**62" if high == MAX_COUNT else str(high)
        raise ValueError(f"SchedulerConfig.{name} must be an int in [{low}, {top}]{why}, got {_show(value)}")


def _check_real(
    cfg: SchedulerConfig,
    name: str,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ValueError(f"SchedulerConfig.{name} must be a number, got {_show(value)}")
    try:
        finite = math.isfinite(value)  # an int too large for a float raises OverflowError
    except OverflowError:
        finite = False
    if not finite:
        raise ValueError(f"SchedulerConfig.{name} must be finite (a float), got {_show(value)}")
    if low is not None and (value < low or (low_open and value == low)):
        raise ValueError(f"SchedulerConfig.{name} must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and (value > high or (high_open and value == high)):
        raise ValueError(f"SchedulerConfig.{name} must be {'<' if high_open else '<='} {high}, got {value!r}")
