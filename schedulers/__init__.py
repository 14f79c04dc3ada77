"""jserve's scheduling policies: pure Python, no jax, shared by the engine and the simulator.

The contract (``Request``, ``StepPlan``, ``Scheduler``, ``SchedulerConfig``, the iteration-cost protocol) and
the ``BlockManager`` live in their own modules; every policy is built by name with ``make_scheduler`` (a policy
of your own too, once ``register_policy`` named it).
See ``docs/schedulers.md`` for the policies and their configuration.
"""

from .base import Scheduler
from .blocks import BlockError, BlockManager
from .config import SchedulerConfig
from .cost import FittedCostModel, IterationCostModel, default_cost_model, plan_compute_time
from .plan import PrefillEntry, StepPlan
from .policy import PolicyBase, SchedulerStats
from .registry import POLICY_NAMES, available_policies, make_scheduler, register_policy
from .request import KVLocation, Request, RequestId, RequestState

__all__ = [
    "BlockError",
    "BlockManager",
    "FittedCostModel",
    "IterationCostModel",
    "KVLocation",
    "POLICY_NAMES",
    "PolicyBase",
    "PrefillEntry",
    "Request",
    "RequestId",
    "RequestState",
    "Scheduler",
    "SchedulerConfig",
    "SchedulerStats",
    "StepPlan",
    "available_policies",
    "default_cost_model",
    "make_scheduler",
    "plan_compute_time",
    "register_policy",
]
