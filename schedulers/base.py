"""The ``Scheduler`` interface: the contract between a policy and an executor (engine or simulator).

Every iteration the executor calls ``plan = scheduler.schedule(now)``, carries the plan out (see
``schedulers.plan`` for the order of copies and compute), then calls
``scheduler.on_step_end(plan, now, elapsed, finished_ids)``. New requests arrive through ``add`` at any
time between steps; ``abort`` cancels one at any time between steps. The scheduler owns every
``Request`` object it admitted and the ``BlockManager``; the executor reads ``request.blocks`` (physical
page ids in the pool named by ``request.kv_location``) and never changes policy state.

Threading: a scheduler is not thread-safe. The executor's loop owns it; other threads hand requests to
that loop.
"""

from __future__ import annotations

import abc
from typing import Iterable

from .blocks import BlockManager
from .config import SchedulerConfig
from .cost import IterationCostModel
from .plan import StepPlan
from .request import Request, RequestId


class Scheduler(abc.ABC):
    """Base class of every policy. Subclasses set ``name`` and implement the abstract methods."""

    name: str = "abstract"

    def __init__(self, config: SchedulerConfig, cost_model: IterationCostModel | None = None) -> None:
        self.config = config
        self.cost_model = cost_model
        self.blocks = BlockManager(
            num_device_blocks=config.num_device_blocks,
            num_host_blocks=config.num_host_blocks,
            block_size=config.block_size,
            reserved_device_ids=config.reserved_device_ids,
        )
        # Live requests (admitted and not yet finished or aborted), keyed by id, in admission order.
        self.requests: dict[RequestId, Request] = {}

    @abc.abstractmethod
    def add(self, request: Request, now: float) -> bool:
        """Admit ``request`` at time ``now``. Returns False (and sets ``request.state`` to REJECTED with
        ``request.reject_reason``) when the request can never run; the next plan lists it in ``rejected``.
        A duplicate live ``request_id`` raises ``ValueError``."""

    @abc.abstractmethod
    def abort(self, request_id: RequestId) -> bool:
        """Cancel a live request and free every block it holds. Returns False if it is not live."""

    @abc.abstractmethod
    def schedule(self, now: float) -> StepPlan:
        """Decide the next iteration at time ``now``: batch membership, chunk sizes, swaps, drops."""

    @abc.abstractmethod
    def on_step_end(
        self, plan: StepPlan, now: float, elapsed: float, finished_ids: Iterable[RequestId] = ()
    ) -> list[Request]:
        """Account for the executed ``plan``: ``now`` is the step's end time and ``elapsed`` its duration.
        Progress advances for every batch entry; a request finishes when it reaches ``max_new_tokens`` or
        is named in ``finished_ids`` (stopped early, e.g. on an end-of-sequence token). Returns the
        requests that finished in this step; their blocks are already freed."""

    # Conveniences shared by every policy.

    def has_unfinished(self) -> bool:
        """True while some admitted request has not finished."""
        return bool(self.requests)

    def get(self, request_id: RequestId) -> Request | None:
        return self.requests.get(request_id)
