"""``make_scheduler``: build any policy by name. The one place that maps names to policy classes.

Names: ``fastserve``, ``mlfq`` (fastserve with every job joining Q0), ``fcfs``, ``vllm``, ``cp``, ``static``,
``fixed-priority``, ``srpt``. Policies are imported lazily so that a partial checkout still serves the
names it has; an unknown name raises ``ValueError`` listing the known ones.
"""

from __future__ import annotations

import importlib
import importlib.util

from .base import Scheduler
from .config import SchedulerConfig
from .cost import IterationCostModel

# name -> (module, class, config overrides forced by the name)
_POLICIES: dict[str, tuple[str, str, dict]] = {
    "fcfs": ("schedulers.fcfs", "FCFSScheduler", {}),
    "fastserve": ("schedulers.fastserve", "FastServeScheduler", {}),
    "mlfq": ("schedulers.fastserve", "FastServeScheduler", {"skip_join": False}),
    "vllm": ("schedulers.vllm", "VLLMScheduler", {}),
    "cp": ("schedulers.chunked", "ChunkedPrefillScheduler", {}),
    "static": ("schedulers.static", "StaticScheduler", {}),
    "fixed-priority": ("schedulers.fixed_priority", "FixedPriorityScheduler", {}),
    "srpt": ("schedulers.srpt", "SRPTScheduler", {}),
}

POLICY_NAMES: tuple[str, ...] = tuple(_POLICIES)
_COST_METHODS = ("prefill_time", "decode_time", "step_time", "swap_time")  # the IterationCostModel protocol


def available_policies() -> list[str]:
    """Names whose module is present in this checkout."""
    out = []
    for name, (module, _, _) in _POLICIES.items():
        if importlib.util.find_spec(module) is not None:
            out.append(name)
    return out


def make_scheduler(
    name: str, config: SchedulerConfig | None = None, cost_model: IterationCostModel | None = None
) -> Scheduler:
    """A new scheduler of policy ``name`` with ``config`` (default: ``SchedulerConfig()``).

    ``cost_model`` is what the policy uses to predict iteration times (skip-join, ENST, the default q0, the
    overlap budget of proactive swaps); policies that need one fall back to ``cost.default_cost_model()``."""
    if not isinstance(name, str) or name not in _POLICIES:
        raise ValueError(f"unknown scheduler policy {name!r}; known policies: {', '.join(POLICY_NAMES)}")
    if config is None:
        config = SchedulerConfig()
    if not isinstance(config, SchedulerConfig):
        raise TypeError(f"make_scheduler: config must be a SchedulerConfig, got {type(config).__name__}")
    if cost_model is not None:
        missing = [m for m in _COST_METHODS if not callable(getattr(cost_model, m, None))]
        if missing:
            raise TypeError(f"make_scheduler: cost_model must be None or an IterationCostModel (schedulers.cost); "
                            f"missing {', '.join(missing)}; got {type(cost_model).__name__}")
    module, cls_name, forced = _POLICIES[name]
    cls = getattr(importlib.import_module(module), cls_name)
    if forced:
        config = config.replace(**forced)
    sched = cls(config, cost_model)
    sched.name = name
    return sched
