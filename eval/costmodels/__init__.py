"""Iteration-cost models and hardware presets for the simulator (and, later, for the engine's profiler).

* ``specs``: ``ModelSpec`` / ``GPUSpec`` and named instances (OPT-13B/66B/175B, Llama-3-8B; A100, H100).
* ``roofline``: an analytic roofline cost model, and the DistServe fitted form scaled to any model and GPU
  from the published OPT-13B/A100 fit.
* ``capacity``: device and host KV pool sizes as the artifact's servers compute them.
* ``presets``: ``HardwarePreset`` (cost model + pool sizing + host link) and ``resolve_preset``.
* ``profile``: the ``jserve-cost-profile/1`` JSON format the engine's profiler will write.
"""

from .capacity import SIZING_RULES, activation_headroom_bytes, device_kv_blocks, host_kv_blocks
from .presets import DEFAULT_PRESET, PRESETS, HardwarePreset, opt13b_calibration, resolve_preset
from .profile import PROFILE_FORMAT, MixedStepCostModel, ProfileError, load_profile, preset_from_dict, profile_dict, save_profile
from .roofline import Calibration, RooflineCostModel, calibrate, calibrated_fit
from .specs import GPUS, MODELS, GPUSpec, ModelSpec

__all__ = [
    "SIZING_RULES",
    "activation_headroom_bytes",
    "device_kv_blocks",
    "host_kv_blocks",
    "DEFAULT_PRESET",
    "PRESETS",
    "HardwarePreset",
    "opt13b_calibration",
    "resolve_preset",
    "PROFILE_FORMAT",
    "ProfileError",
    "load_profile",
    "preset_from_dict",
    "profile_dict",
    "save_profile",
    "Calibration",
    "RooflineCostModel",
    "calibrate",
    "calibrated_fit",
    "GPUS",
    "MODELS",
    "GPUSpec",
    "ModelSpec",
]
