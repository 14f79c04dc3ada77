"""Named hardware settings for the simulator: a cost model plus what sizes the KV pools and the copy link.

A ``HardwarePreset`` bundles the iteration-cost model (``schedulers.cost.IterationCostModel``), the model and
GPU specs the KV pools are sized from (or a fixed, measured device pool size), the tensor-parallel degree and
the host link. ``resolve_preset`` accepts:

* a registered name (``PRESETS``): see ``docs/eval.md`` for each one's provenance;
* ``roofline:<model>:<gpu>[:<tp>]``: the ideal roofline (``RooflineCostModel``) for a named model and GPU;
* ``calibrated:<model>:<gpu>[:<tp>]``: the DistServe form scaled from the OPT-13B/A100 fit (``calibrated_fit``);
* a path to a profile JSON file (``eval.costmodels.profile``).

Which presets are validated against measurements: ``opt-13b-a100`` and ``opt-13b-a100-vllmfit`` are the
published fits themselves. ``llama-3-8b-a100`` is derived (same kernel efficiencies as OPT-13B on the same GPU);
the OPT-66B/175B presets are derived and additionally rest on an assumed tensor-parallel layout and an
uncalibrated all-reduce term, so no figure uses them by default.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from schedulers.cost import (
    OPT13B_A100_DISTSERVE_MS,
    OPT13B_A100_VLLM_MS,
    FittedCostModel,
    IterationCostModel,
)

from .capacity import device_kv_blocks, host_kv_blocks
from .roofline import Calibration, RooflineCostModel, calibrate, calibrated_fit
from .specs import A100_40GB, A100_80GB, GPUS, LLAMA3_8B, MODELS, OPT_13B, OPT_66B, OPT_175B, GiB, GPUSpec, ModelSpec


@dataclass(frozen=True)
class ServingLimits:
    """The limits of the engine a profile was measured on (a profile's ``engine`` field): its context, batch and
    step sizes and its host pool. A simulation standing in for that engine runs with them."""

    max_model_len: int
    max_batch_size: int
    max_tokens_per_batch: int
    num_host_blocks: int


@dataclass(frozen=True)
class HardwarePreset:
    """A cost model and the memory/link facts that go with it. ``block_bytes`` is for ``block_size`` tokens."""

    name: str
    cost: IterationCostModel
    block_size: int
    block_bytes: int  # one KV block of all layers on one GPU shard
    link_bandwidth: float  # bytes/s, one direction, per GPU
    link_latency: float = 0.0  # seconds per copy batch
    link_full_duplex: bool = False
    model: ModelSpec | None = None
    gpu: GPUSpec | None = None
    tp: int = 1
    fixed_device_blocks: int | None = None  # measured pool size (profile files); overrides the sizing rules
    limits: ServingLimits | None = None  # the profiled engine's limits (profile files written by `jserve profile`)
    provenance: str = ""
    validated: bool = False

    def device_blocks(self, rule: str = "fastserve", *, max_tokens_per_batch: int = 2048, max_batch_size: int = 16) -> int:
        """Device KV blocks as the server family named by ``rule`` would allocate them."""
        if self.fixed_device_blocks is not None:
            return self.fixed_device_blocks
        if self.model is None or self.gpu is None:
            raise ValueError(f"preset {self.name!r} has neither a model/GPU spec nor a fixed device block count")
        return device_kv_blocks(
            self.model,
            self.gpu,
            rule=rule,
            tp=self.tp,
            block_size=self.block_size,
            max_tokens_per_batch=max_tokens_per_batch,
            max_batch_size=max_batch_size,
        )

    def host_blocks(self, swap_space_gib: float) -> int:
        if not swap_space_gib >= 0:
            raise ValueError(f"swap space must be >= 0 GiB, got {swap_space_gib!r}")
        if self.model is not None:
            return host_kv_blocks(self.model, swap_space_gib, tp=self.tp, block_size=self.block_size)
        return int(swap_space_gib * GiB // self.block_bytes)

    def batch1_decode_time(self, context: int = 1) -> float:
        return self.cost.decode_time(1, context)


def _from_fit(name: str, fit: FittedCostModel, model: ModelSpec, gpu: GPUSpec, tp: int, provenance: str, validated: bool):
    return HardwarePreset(
        name=name,
        cost=fit,
        block_size=16,
        block_bytes=model.kv_block_bytes(16) // tp,
        link_bandwidth=gpu.host_link_bandwidth,
        model=model,
        gpu=gpu,
        tp=tp,
        provenance=provenance,
        validated=validated,
    )


@lru_cache(maxsize=None)
def opt13b_calibration() -> Calibration:
    """Kernel-efficiency ratios of the published OPT-13B/A100 DistServe fit (``roofline.calibrate``)."""
    fit = FittedCostModel.from_ms(**OPT13B_A100_DISTSERVE_MS)
    return calibrate(fit, OPT_13B, A100_40GB, source="OPT-13B/A100 DistServe fit")


def _opt13b(fit_ms: dict, label: str, provenance: str) -> HardwarePreset:
    fit = FittedCostModel.from_ms(
        **fit_ms,
        block_bytes=OPT_13B.kv_block_bytes(16),
        swap_bandwidth=A100_40GB.host_link_bandwidth,
        name=f"opt-13b/a100-40gb ({label})",
    )
    return _from_fit(f"opt-13b-a100{'' if label == 'DistServe fit' else '-vllmfit'}", fit, OPT_13B, A100_40GB, 1, provenance, True)


def _derived(name: str, model: ModelSpec, gpu: GPUSpec, tp: int, provenance: str) -> HardwarePreset:
    fit = calibrated_fit(model, gpu, opt13b_calibration(), tp=tp, block_size=16, name=name)
    return _from_fit(name, fit, model, gpu, tp, provenance, False)


def _build_presets() -> dict[str, HardwarePreset]:
    presets = [
        _opt13b(
            OPT13B_A100_DISTSERVE_MS,
            "DistServe fit",
            "OPT-13B fp16 on one A100-40GB: DistServe's published fitted iteration costs (DESIGN.md section 6); "
            "PCIe 4.0 x16 at 25 GB/s.",
        ),
        _opt13b(
            OPT13B_A100_VLLM_MS,
            "vLLM-engine fit",
            "OPT-13B fp16 on one A100-40GB: the same fit measured on the vLLM engine (DESIGN.md section 6).",
        ),
        _derived(
            "llama-3-8b-a100",
            LLAMA3_8B,
            A100_40GB,
            1,
            "Llama-3-8B bf16 (GQA, 8 KV heads) on one A100-40GB: each OPT-13B fit coefficient scaled by the ratio "
            "of its physical driver (weight bytes, dense FLOPs/token, attention FLOPs/token^2, KV bytes/token); "
            "assumes the same kernel efficiencies as OPT-13B on the same GPU. Not validated by a measurement.",
        ),
        _derived(
            "opt-66b-4xa100",
            OPT_66B,
            A100_40GB,
            4,
            "OPT-66B on 4 x A100-40GB, tensor parallel (assumed layout), OPT-13B-calibrated efficiencies plus an "
            "uncalibrated ring all-reduce term over NVLink. Batch-1 decode comes out at 27 ms/token; the paper's "
            "low-load normalized latency (0.05 s/token vs 0.03 for OPT-13B) suggests its setup was slower, so treat "
            "this preset as an estimate. Not used by any figure.",
        ),
        _derived(
            "opt-175b-8xa100-80gb",
            OPT_175B,
            A100_80GB,
            8,
            "OPT-175B on 8 x A100-80GB, tensor parallel (assumed layout; 350 GB of weights do not fit 8 x 40 GB with "
            "room for KV), same caveats as opt-66b-4xa100 (paper low-load 0.08 s/token vs our 28 ms/token decode). "
            "Not used by any figure.",
        ),
    ]
    return {p.name: p for p in presets}


PRESETS: dict[str, HardwarePreset] = _build_presets()
DEFAULT_PRESET = "opt-13b-a100"


def _lookup(kind: str, table: dict, key: str):
    if key not in table:
        raise ValueError(f"unknown {kind} {key!r}; choose one of {', '.join(sorted(table))}")
    return table[key]


def resolve_preset(spec: str | HardwarePreset) -> HardwarePreset:
    """A preset by name, ``roofline:<model>:<gpu>[:<tp>]``, ``calibrated:<model>:<gpu>[:<tp>]`` or profile path."""
    if isinstance(spec, HardwarePreset):
        return spec
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"a hardware preset must be a non-empty name or path, got {spec!r}")
    if spec in PRESETS:
        return PRESETS[spec]
    kind, sep, rest = spec.partition(":")
    if sep and kind in ("roofline", "calibrated"):
        parts = rest.split(":")
        if len(parts) not in (2, 3):
            raise ValueError(f"preset {spec!r}: expected {kind}:<model>:<gpu>[:<tp>]")
        model = _lookup("model", MODELS, parts[0])
        gpu = _lookup("GPU", GPUS, parts[1])
        try:
            tp = int(parts[2]) if len(parts) == 3 else 1
        except ValueError:
            raise ValueError(f"preset {spec!r}: tensor-parallel degree must be an integer, got {parts[2]!r}") from None
        if kind == "calibrated":
            return _derived(spec, model, gpu, tp, "calibrated from the OPT-13B/A100 fit (roofline.calibrated_fit)")
        cost = RooflineCostModel(model, gpu, tp=tp)
        return HardwarePreset(
            name=spec,
            cost=cost,
            block_size=16,
            block_bytes=cost.block_bytes,
            link_bandwidth=gpu.host_link_bandwidth,
            model=model,
            gpu=gpu,
            tp=tp,
            provenance="ideal roofline (every kernel at peak FLOP/s or bandwidth); a lower bound on step times",
        )
    path = Path(spec)
    if path.suffix == ".json" or path.exists():
        from .profile import load_profile

        return load_profile(path)
    raise ValueError(
        f"unknown hardware preset {spec!r}; choose one of {', '.join(sorted(PRESETS))}, "
        "roofline:<model>:<gpu>[:<tp>], calibrated:<model>:<gpu>[:<tp>] or a profile .json path"
    )
