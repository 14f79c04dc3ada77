"""Analytic iteration costs from a ``ModelSpec`` and a ``GPUSpec``: a true roofline, and a calibrated fit.

Two models live here:

* ``RooflineCostModel`` implements ``schedulers.cost.IterationCostModel`` directly: an iteration takes
  ``max(FLOPs / (peak * flops_efficiency), bytes / (bandwidth * memory_efficiency)) + overhead`` (plus tensor-
  parallel all-reduces). With the default efficiencies of 1 it is the ideal lower bound of a step.
* ``calibrated_fit`` produces a ``FittedCostModel`` (DistServe's linear form) for any model and GPU by scaling
  each fitted coefficient with the physical quantity that drives it. The scale factors (``Calibration``) are
  derived from a measured fit on one (model, GPU) pair, by default the published OPT-13B/A100 fit:

  ======  ==============================================  =====================================
  coeff   physical driver (per GPU)                        what the ratio absorbs
  ======  ==============================================  =====================================
  p0      weight bytes / HBM bandwidth                     launch + weight streaming in a prefill
  p1      dense FLOPs per token / peak FLOP/s              matmul efficiency (about 81% for OPT-13B)
  p2      attention FLOPs per token^2 / peak FLOP/s        attention kernel efficiency (about 18%)
  d0      weight bytes / HBM bandwidth                     memory efficiency + fixed overhead
  d1      KV bytes per token / HBM bandwidth               KV read efficiency (about 84%)
  d2      dense FLOPs per token / peak FLOP/s              per-request marginal cost of a decode
  ======  ==============================================  =====================================

  Calibrating against a fit and applying it to the same pair returns that fit exactly; applying it to
  another model on the same GPU (Llama-3-8B on the A100) assumes the kernels reach the same efficiencies.
  Tensor parallelism divides every per-GPU quantity by ``tp`` and adds two ring all-reduces per layer
  (``2 (tp-1)/tp * tokens * hidden * dtype`` bytes at the interconnect bandwidth, plus a fixed latency each);
  the all-reduce terms are not calibrated against any measurement.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from schedulers.cost import FittedCostModel

from .specs import ModelSpec, GPUSpec


@dataclass(frozen=True)
class Calibration:
    """Ratios of fitted coefficients to their physical drivers (dimensionless). See the module docstring."""

    p0: float
    p1: float
    p2: float
    d0: float
    d1: float
    d2: float
    source: str = "uncalibrated"

    @classmethod
    def ideal(cls) -> "Calibration":
        """Every kernel at its roofline and no fixed overhead beyond streaming the weights once."""
        return cls(1.0, 1.0, 1.0, 1.0, 1.0, 0.0, source="ideal roofline")


def _drivers(model: ModelSpec, gpu: GPUSpec, tp: int) -> dict[str, float]:
    """Seconds per unit of each coefficient's physical driver, per GPU (see the module table)."""
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ValueError(f"tensor-parallel degree tp must be an int >= 1, got {tp!r}")
    weights = model.weight_bytes / tp / gpu.hbm_bandwidth
    dense = model.matmul_flops_per_token / tp / gpu.peak_flops
    # A prefill chunk of n tokens after c cached ones touches (n^2 + 2nc) / 2 (query, key) pairs.
    attention = model.attention_flops_per_token_pair / 2 / tp / gpu.peak_flops
    kv = model.kv_bytes_per_token / tp / gpu.hbm_bandwidth
    return dict(p0=weights, p1=dense, p2=attention, d0=weights, d1=kv, d2=dense)


def _allreduce_terms(model: ModelSpec, gpu: GPUSpec, tp: int) -> tuple[float, float]:
    """(fixed seconds per iteration, seconds per token) of the 2 all-reduces per layer under tensor parallelism."""
    if tp == 1:
        return 0.0, 0.0
    n = 2 * model.num_layers
    per_token = n * 2 * (tp - 1) / tp * model.hidden_size * model.dtype_bytes / gpu.interconnect_bandwidth
    return n * gpu.interconnect_latency, per_token


def calibrate(fit: FittedCostModel, model: ModelSpec, gpu: GPUSpec, source: str = "") -> Calibration:
    """Ratios that make ``calibrated_fit(model, gpu, calibration)`` reproduce ``fit`` (single GPU)."""
    drivers = _drivers(model, gpu, 1)
    return Calibration(
        **{name: getattr(fit, name) / drivers[name] for name in ("p0", "p1", "p2", "d0", "d1", "d2")},
        source=source or f"calibrated on {fit.name}",
    )


def calibrated_fit(
    model: ModelSpec,
    gpu: GPUSpec,
    calibration: Calibration,
    *,
    tp: int = 1,
    block_size: int = 16,
    swap_latency: float = 0.0,
    name: str | None = None,
) -> FittedCostModel:
    """A ``FittedCostModel`` for ``model`` on ``tp`` GPUs of kind ``gpu``, from ``calibration``'s ratios.

    Swaps copy each GPU's shard of a block over its own host link, in parallel."""
    drivers = _drivers(model, gpu, tp)
    fixed, per_token = _allreduce_terms(model, gpu, tp)
    coeffs = {k: getattr(calibration, k) * v for k, v in drivers.items()}
    coeffs["p0"] += fixed
    coeffs["d0"] += fixed
    coeffs["p1"] += per_token
    coeffs["d2"] += per_token
    return FittedCostModel(
        **coeffs,
        block_bytes=model.kv_block_bytes(block_size) // tp,
        swap_bandwidth=gpu.host_link_bandwidth,
        swap_latency=swap_latency,
        name=name or f"{model.name}/{'%dx' % tp if tp > 1 else ''}{gpu.name} ({calibration.source})",
    )


@dataclass(frozen=True)
class RooflineCostModel:
    """Step time = max(compute time, memory time) + overhead, from first principles.

    Bytes moved per step: the weights once, plus the KV entries every computed token reads or writes. FLOPs:
    the dense projections of every scheduled token plus attention over each token's context. Efficiencies
    scale the peaks (1.0 = ideal). Implements ``schedulers.cost.IterationCostModel``."""

    model: ModelSpec
    gpu: GPUSpec
    tp: int = 1
    block_size: int = 16
    flops_efficiency: float = 1.0
    memory_efficiency: float = 1.0
    overhead: float = 0.0  # seconds per non-empty iteration
    swap_latency: float = 0.0

    def __post_init__(self) -> None:
        _drivers(self.model, self.gpu, self.tp)  # validates tp
        for field_name in ("flops_efficiency", "memory_efficiency"):
            value = getattr(self, field_name)
            if not 0 < value <= 1:
                raise ValueError(f"RooflineCostModel.{field_name} must be in (0, 1], got {value!r}")
        if not self.overhead >= 0 or not self.swap_latency >= 0:
            raise ValueError("RooflineCostModel.overhead and swap_latency must be >= 0")

    @property
    def name(self) -> str:
        return f"roofline {self.model.name}/{self.gpu.name} tp={self.tp}"

    @property
    def block_bytes(self) -> int:
        return self.model.kv_block_bytes(self.block_size) // self.tp

    @property
    def swap_bandwidth(self) -> float:
        return self.gpu.host_link_bandwidth

    def _time(self, tokens: int, pairs: float, kv_tokens: int) -> float:
        m, g = self.model, self.gpu
        flops = (m.matmul_flops_per_token * tokens + m.attention_flops_per_token_pair * pairs) / self.tp
        nbytes = (m.weight_bytes + m.kv_bytes_per_token * kv_tokens) / self.tp
        fixed, per_token = _allreduce_terms(m, g, self.tp)
        compute = flops / (g.peak_flops * self.flops_efficiency)
        memory = nbytes / (g.hbm_bandwidth * self.memory_efficiency)
        return max(compute, memory) + self.overhead + fixed + per_token * tokens

    def prefill_time(self, prompt_len: int) -> float:
        return self.step_time([(prompt_len, 0)], [])

    def decode_time(self, batch_size: int, total_context: int) -> float:
        if batch_size <= 0:
            return 0.0
        return self._time(batch_size, total_context, total_context)

    def step_time(self, prefill: Sequence[tuple[int, int]], decode_contexts: Sequence[int]) -> float:
        if not prefill and not decode_contexts:
            return 0.0
        tokens = sum(n for n, _ in prefill) + len(decode_contexts)
        pairs = sum((n * n + 2 * n * c) / 2 for n, c in prefill) + sum(decode_contexts)
        kv_tokens = sum(n + c for n, c in prefill) + sum(decode_contexts)
        return self._time(tokens, pairs, kv_tokens)

    def swap_time(self, num_blocks: int) -> float:
        if num_blocks <= 0:
            return 0.0
        return self.swap_latency + num_blocks * self.block_bytes / self.swap_bandwidth
