"""``make_scheduler``: build any policy by name. The one place that maps names to policy classes.

Names: ``fastserve``, ``mlfq`` (fastserve with every job joining Q0), ``fcfs``, ``vllm``, ``cp``, ``static``,
``fixed-priority``, ``srpt``. Policies are imported lazily so that a partial checkout still serves the
names it has; an unknown name raises ``ValueError`` listing the known ones.

``register_policy(name, cls)`` adds a policy of your own (a ``PolicyBase`` subclass) under a new name, so
that everything that builds schedulers by name (``make_scheduler``, the eval's ``SystemSpec``/``RunSpec`` and
the figure runner) can run it. Registration lives in the process: register at import time of a module that
every process running it imports (see docs/schedulers.md, "Adding a policy").
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util

from .base import Scheduler
from .config import SchedulerConfig
from .cost import IterationCostModel

# name -> (module, class or class name, config overrides forced by the name)
_POLICIES: dict[str, tuple[str, str | type, dict]] = {
    "fcfs": ("schedulers.fcfs", "FCFSScheduler", {}),
    "fastserve": ("schedulers.fastserve", "FastServeScheduler", {}),
    "mlfq": ("schedulers.fastserve", "FastServeScheduler", {"skip_join": False}),
    "vllm": ("schedulers.vllm", "VLLMScheduler", {}),
    "cp": ("schedulers.chunked", "ChunkedPrefillScheduler", {}),
    "static": ("schedulers.static", "StaticScheduler", {}),
    "fixed-priority": ("schedulers.fixed_priority", "FixedPriorityScheduler", {}),
    "srpt": ("schedulers.srpt", "SRPTScheduler", {}),
}

POLICY_NAMES: tuple[str, ...] = tuple(_POLICIES)  # the built-in policies (registered ones are not listed)
_COST_METHODS = ("prefill_time", "decode_time", "step_time", "swap_time")  # the IterationCostModel protocol


def available_policies() -> list[str]:
    """Names ``make_scheduler`` can build now: the built-ins whose module is present in this checkout, then
    the policies registered with ``register_policy``."""
    out = []
    for name, (module, target, _) in _POLICIES.items():
        if isinstance(target, type) or importlib.util.find_spec(module) is not None:
            out.append(name)
    return out


def register_policy(name: str, cls: type, *, replace: bool = False, overrides: dict | None = None) -> None:
    """Make ``make_scheduler(name, ...)`` build ``cls`` (a ``schedulers.PolicyBase`` subclass, constructed as
    ``cls(config, cost_model)``), with ``name`` as its ``name``. ``overrides``: ``SchedulerConfig`` fields the
    name forces (as ``mlfq`` forces ``skip_join=False``). A name already taken (a built-in or an earlier
    registration) is refused unless ``replace=True``."""
    from .policy import PolicyBase

    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"register_policy: name must be a non-empty string, got {name!r}")
    if not (isinstance(cls, type) and issubclass(cls, PolicyBase)):
        raise TypeError(f"register_policy: {name!r}: cls must be a subclass of schedulers.PolicyBase, got {cls!r}")
    if not isinstance(replace, bool):
        raise TypeError(f"register_policy: replace must be a bool, got {replace!r}")
    forced = dict(overrides or {})
    unknown = sorted(set(forced) - {f.name for f in dataclasses.fields(SchedulerConfig)})
    if unknown:  # values are checked with the config they change, at make_scheduler
        raise ValueError(f"register_policy: {name!r}: overrides names unknown SchedulerConfig fields {unknown}")
    if name in _POLICIES and not replace:
        module, target, _ = _POLICIES[name]
        taken = f"{module}.{target.__qualname__ if isinstance(target, type) else target}"
        raise ValueError(f"register_policy: the name {name!r} is taken (by {taken}); pass replace=True to replace it")
    _POLICIES[name] = (cls.__module__, cls, forced)


def make_scheduler(
    name: str, config: SchedulerConfig | None = None, cost_model: IterationCostModel | None = None
) -> Scheduler:
    """A new scheduler of policy ``name`` with ``config`` (default: ``SchedulerConfig()``).

    ``cost_model`` is what the policy uses to predict iteration times (skip-join, ENST, the default q0, the
    overlap budget of proactive swaps); policies that need one fall back to ``cost.default_cost_model()``."""
    if not isinstance(name, str) or name not in _POLICIES:
        raise ValueError(f"unknown scheduler policy {name!r}; known policies: {', '.join(_POLICIES)}")
    if config is None:
        config = SchedulerConfig()
    if not isinstance(config, SchedulerConfig):
        raise TypeError(f"make_scheduler: config must be a SchedulerConfig, got {type(config).__name__}")
    if cost_model is not None:
        missing = [m for m in _COST_METHODS if not callable(getattr(cost_model, m, None))]
        if missing:
            raise TypeError(f"make_scheduler: cost_model must be None or an IterationCostModel (schedulers.cost); "
                            f"missing {', '.join(missing)}; got {type(cost_model).__name__}")
    module, target, forced = _POLICIES[name]
    cls = target if isinstance(target, type) else getattr(importlib.import_module(module), target)
    if forced:
        config = config.replace(**forced)
    sched = cls(config, cost_model)
    sched.name = name
    return sched
