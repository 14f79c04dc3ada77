"""Cost-profile files: measured iteration-cost coefficients plus hardware facts, as JSON.

The engine's profiler (a later issue) measures prefill and decode step times on a grid, fits them to the
DistServe form of ``schedulers.cost.FittedCostModel``, and writes this file; the simulator loads it with
``--hardware PATH`` (or ``resolve_preset(PATH)``). Format ``jserve-cost-profile/1``::

    {
      "format": "jserve-cost-profile/1",
      "name": "smollm2-135m/h100",                 # free text, used in logs and plots
      "prefill_ms": [p0, p1, p2],                   # ms, ms/token, ms/token^2
      "decode_ms": [d0, d1, d2],                    # ms, ms/token of context, ms/request
      "mixed_decode_ms": [m1, m2],                  # optional: decodes in a step with prefill work
      "block_size": 16,                             # tokens per KV block
      "block_bytes": 13107200,                      # bytes of one block, all layers, K and V, one GPU shard
      "swap": {"bandwidth_bytes_per_s": 2.5e10,     # host<->device copy rate, one direction
               "latency_s": 0.0,                    # fixed cost per copy batch (optional, default 0)
               "full_duplex": false},               # both directions at once (optional, default false)
      "num_device_blocks": 883,                     # optional: the engine's measured pool size
      "model": {...ModelSpec fields...},            # optional: size pools from memory instead
      "device": {...GPUSpec fields...},             # optional, with "model"
      "tp": 1,                                      # optional
      "engine": {"max_model_len": 512, ...},        # optional: the profiled engine's settings; its context,
                                                    # batch, tokens per step and host pool limit a simulation
                                                    # standing in for it (``RunSpec.device``)
      "provenance": "how and where it was measured" # optional
    }

``mixed_decode_ms`` (written by ``jserve profile``) prices each decode that shares an iteration with prefill
work at ``m1`` per context token and ``m2`` per request instead of ``d1``/``d2`` (``MixedStepCostModel``);
without it a mixed iteration costs what ``FittedCostModel`` says. With it, ``shape_buckets``
(``{"tokens": [...], "sequences": [...]}``: the engine's compiled token and sequence buckets) puts the
per-token and per-request terms on padded counts, and ``shape_costs_ms`` (same keys, one measured cost per
bucket) replaces the linear base of a step by its bucket's measured cost. Unknown extra fields (the profiler's raw
points and fit diagnostics) are ignored.

Either ``num_device_blocks`` or both ``model`` and ``device`` must be present. Every error names the file and
the field.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from schedulers.cost import FittedCostModel

from .presets import HardwarePreset, ServingLimits
from .specs import GPUSpec, ModelSpec

PROFILE_FORMAT = "jserve-cost-profile/1"


def pad_to_bucket(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= ``n`` (``n`` itself without buckets or past the largest)."""
    for b in buckets:
        if b >= n:
            return b
    return n


@dataclass(frozen=True, slots=True)
class MixedStepCostModel(FittedCostModel):
    """``FittedCostModel`` priced the way the engine runs steps.

    * Mixed iterations (prefill work and decodes together) price each decode at ``m1`` seconds per context
      token and ``m2`` seconds per request (the ragged kernel prices a decode differently from the decode
      kernel).
    * With ``token_buckets`` / ``seq_buckets`` (the engine's compiled shapes), the per-token term of a step
      with prefill work is paid on the padded token count (every packed token of the bucket, decodes riding
      along included) and the per-request decode term on the padded batch: the engine computes the padding.
      The attention terms stay on the real lengths (padding attends to nothing).
    * With ``token_costs`` / ``seq_costs`` too (one measured cost per bucket, from ``jserve profile``), a
      step's base is its bucket's cost instead of a line through the buckets: ``token_costs[T]`` for a step
      with prefill work in token bucket ``T`` (replacing ``p0 + p1 * T``), ``seq_costs[S]`` for a decode-only
      step in sequence bucket ``S`` (replacing ``d0 + d2 * S``). A step whose every row computes one token
      (one-token prompts included) runs as a decode step, as in the engine. Past the largest bucket the
      largest bucket's cost is scaled by the size.
    """

    m1: float = 0.0
    m2: float = 0.0
    token_buckets: tuple[int, ...] = ()
    seq_buckets: tuple[int, ...] = ()
    token_costs: tuple[float, ...] = ()
    seq_costs: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        FittedCostModel.__post_init__(self)
        for field_name in ("m1", "m2"):
            value = getattr(self, field_name)
            if not value >= 0:
                raise ValueError(f"MixedStepCostModel.{field_name} must be >= 0, got {value!r}")
        for costs, buckets, label in ((self.token_costs, self.token_buckets, "token"),
                                      (self.seq_costs, self.seq_buckets, "seq")):
            if costs and len(costs) != len(buckets):
                raise ValueError(f"MixedStepCostModel.{label}_costs has {len(costs)} entries for "
                                 f"{len(buckets)} {label}_buckets")
            if any(not (c >= 0 and math.isfinite(c)) for c in costs):
                raise ValueError(f"MixedStepCostModel.{label}_costs must be finite and >= 0, got {costs!r}")

    def _token_base(self, tokens: int) -> float:
        if self.token_costs:
            return _bucket_cost(tokens, self.token_buckets, self.token_costs)
        return self.p0 + self.p1 * pad_to_bucket(tokens, self.token_buckets)

    def _seq_base(self, batch_size: int) -> float:
        if self.seq_costs:
            return _bucket_cost(batch_size, self.seq_buckets, self.seq_costs)
        return self.d0 + self.d2 * pad_to_bucket(batch_size, self.seq_buckets)

    def prefill_time(self, prompt_len: int) -> float:
        if self.seq_costs and prompt_len == 1:
            return self.decode_time(1, 1)
        return self._token_base(prompt_len) + self.p2 * prompt_len * prompt_len

    def decode_time(self, batch_size: int, total_context: int) -> float:
        if batch_size <= 0:
            return 0.0
        return self._seq_base(batch_size) + self.d1 * total_context

    def step_time(self, prefill: Sequence[tuple[int, int]], decode_contexts: Sequence[int]) -> float:
        if not prefill:
            return self.decode_time(len(decode_contexts), sum(decode_contexts)) if decode_contexts else 0.0
        if self.seq_costs and all(n == 1 for n, _ in prefill):  # every row one token: a decode step
            contexts = [c + 1 for _, c in prefill] + list(decode_contexts)
            return self.decode_time(len(contexts), sum(contexts))
        tokens = sum(n for n, _ in prefill)
        attention = sum(n * n + 2 * n * c for n, c in prefill)
        if not decode_contexts:
            return self._token_base(tokens) + self.p2 * attention
        extra = self.m1 * sum(decode_contexts) + self.m2 * len(decode_contexts)
        if self.token_costs:
            return self._token_base(tokens + len(decode_contexts)) + self.p2 * attention + extra
        # Decodes ride in the packed tokens; without buckets the per-token term counts prefill tokens only
        # (the simulator's original form).
        linear = pad_to_bucket(tokens + len(decode_contexts), self.token_buckets) if self.token_buckets else tokens
        return max(self.p0, self.d0) + self.p1 * linear + self.p2 * attention + extra


def _bucket_cost(n: int, buckets: Sequence[int], costs: Sequence[float]) -> float:
    """The cost of the smallest bucket >= ``n``; past the largest, its cost scaled by ``n / largest``."""
    for b, c in zip(buckets, costs):
        if b >= n:
            return c
    return costs[-1] * n / buckets[-1]


class ProfileError(ValueError):
    """A profile file that cannot be read or does not follow the format."""


def _number(data: dict, key: str, where: str, *, positive: bool = False, default=None) -> float:
    if key not in data:
        if default is not None:
            return default
        raise ProfileError(f"{where}: missing field {key!r}")
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ProfileError(f"{where}: field {key!r} must be a finite number, got {value!r}")
    if value < 0 or (positive and value == 0):
        raise ProfileError(f"{where}: field {key!r} must be {'> 0' if positive else '>= 0'}, got {value!r}")
    return value


def _triple(data: dict, key: str, where: str) -> tuple[float, float, float]:
    value = data.get(key)
    if not isinstance(value, list) or len(value) != 3:
        raise ProfileError(f"{where}: field {key!r} must be a list of 3 numbers, got {value!r}")
    return tuple(_number({key: v}, key, where) for v in value)  # type: ignore[return-value]


def _int(data: dict, key: str, where: str, default: int | None = None, low: int = 1) -> int:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ProfileError(f"{where}: field {key!r} must be an integer >= {low}, got {value!r}")
    return value


def preset_from_dict(data: dict, where: str = "profile") -> HardwarePreset:
    """Validate a decoded profile and build its ``HardwarePreset``."""
    if not isinstance(data, dict):
        raise ProfileError(f"{where}: the top level must be a JSON object")
    if data.get("format") != PROFILE_FORMAT:
        raise ProfileError(f"{where}: field 'format' must be {PROFILE_FORMAT!r}, got {data.get('format')!r}")
    prefill = _triple(data, "prefill_ms", where)
    decode = _triple(data, "decode_ms", where)
    block_size = _int(data, "block_size", where)
    block_bytes = _int(data, "block_bytes", where)
    swap = data.get("swap")
    if not isinstance(swap, dict):
        raise ProfileError(f"{where}: field 'swap' must be an object with 'bandwidth_bytes_per_s'")
    bandwidth = _number(swap, "bandwidth_bytes_per_s", f"{where}: swap", positive=True)
    latency = _number(swap, "latency_s", f"{where}: swap", default=0.0)
    duplex = swap.get("full_duplex", False)
    if not isinstance(duplex, bool):
        raise ProfileError(f"{where}: swap field 'full_duplex' must be true or false, got {duplex!r}")
    tp = _int(data, "tp", where, default=1)
    fixed = data.get("num_device_blocks")
    if fixed is not None:
        fixed = _int(data, "num_device_blocks", where)
    model = gpu = None
    try:
        if data.get("model") is not None:
            model = ModelSpec(**data["model"])
        if data.get("device") is not None:
            gpu = GPUSpec(**data["device"])
    except TypeError as exc:
        raise ProfileError(f"{where}: bad 'model' or 'device' object: {exc}") from None
    except ValueError as exc:
        raise ProfileError(f"{where}: {exc}") from None
    if fixed is None and (model is None or gpu is None):
        raise ProfileError(f"{where}: give 'num_device_blocks', or both 'model' and 'device' to size the KV pool")
    name = str(data.get("name") or where)
    cost = FittedCostModel.from_ms(
        prefill_ms=prefill,
        decode_ms=decode,
        block_bytes=block_bytes,
        swap_bandwidth=bandwidth,
        swap_latency=latency,
        name=name,
    )
    if data.get("mixed_decode_ms") is not None:
        mixed = data["mixed_decode_ms"]
        if not isinstance(mixed, list) or len(mixed) != 2:
            raise ProfileError(f"{where}: field 'mixed_decode_ms' must be a list of 2 numbers, got {mixed!r}")
        m1, m2 = (_number({"mixed_decode_ms": v}, "mixed_decode_ms", where) / 1e3 for v in mixed)
        fields = {f: getattr(cost, f) for f in FittedCostModel.__dataclass_fields__}
        buckets = data.get("shape_buckets") or {}
        if not isinstance(buckets, dict):
            raise ProfileError(f"{where}: field 'shape_buckets' must be an object with 'tokens' and 'sequences'")
        shapes = {}
        for key, attr in (("tokens", "token_buckets"), ("sequences", "seq_buckets")):
            vals = buckets.get(key, [])
            if not isinstance(vals, list) or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in vals):
                raise ProfileError(f"{where}: shape_buckets.{key} must be a list of positive integers, got {vals!r}")
            if vals != sorted(set(vals)):
                raise ProfileError(f"{where}: shape_buckets.{key} must be increasing, got {vals!r}")
            shapes[attr] = tuple(vals)
        costs = data.get("shape_costs_ms")
        if costs is not None:
            if not isinstance(costs, dict):
                raise ProfileError(f"{where}: field 'shape_costs_ms' must be an object with 'tokens' and 'sequences'")
            for key, attr, bucket_attr in (("tokens", "token_costs", "token_buckets"),
                                           ("sequences", "seq_costs", "seq_buckets")):
                vals = costs.get(key, [])
                if not isinstance(vals, list) or len(vals) != len(shapes[bucket_attr]):
                    raise ProfileError(f"{where}: shape_costs_ms.{key} must be a list of one number per "
                                       f"shape_buckets.{key} entry ({len(shapes[bucket_attr])}), got {vals!r}")
                shapes[attr] = tuple(_number({f"shape_costs_ms.{key}": v}, f"shape_costs_ms.{key}", where) / 1e3
                                     for v in vals)
        cost = MixedStepCostModel(**fields, m1=m1, m2=m2, **shapes)
    _check_prices(cost, where)
    return HardwarePreset(
        name=name,
        cost=cost,
        block_size=block_size,
        block_bytes=block_bytes,
        link_bandwidth=bandwidth,
        link_latency=latency,
        link_full_duplex=duplex,
        model=model,
        gpu=gpu,
        tp=tp,
        fixed_device_blocks=fixed,
        limits=_limits(data, where),
        provenance=str(data.get("provenance", f"profile file {where}")),
        validated=True,
    )


_LIMITS = ("max_model_len", "max_batch_size", "max_tokens_per_batch", "num_host_blocks")


def _limits(data: dict, where: str) -> ServingLimits | None:
    """The profiled engine's limits from the optional ``engine`` object (``jserve profile`` writes it with the
    engine's settings); None when it is absent or does not hold all four (then it is provenance only)."""
    engine = data.get("engine")
    if engine is None:
        return None
    if not isinstance(engine, dict):
        raise ProfileError(f"{where}: field 'engine' must be an object (the profiled engine's settings)")
    if not all(f in engine for f in _LIMITS):
        return None
    values = {f: _int(engine, f, f"{where}: engine", low=0 if f == "num_host_blocks" else 1) for f in _LIMITS}
    if values["max_tokens_per_batch"] < values["max_batch_size"]:
        raise ProfileError(f"{where}: engine.max_tokens_per_batch ({values['max_tokens_per_batch']}) must be >= "
                           f"engine.max_batch_size ({values['max_batch_size']})")
    return ServingLimits(**values)


def _check_prices(cost: FittedCostModel, where: str) -> None:
    """Every coefficient may be 0 alone, but a step must take time (else the simulated clock never moves and the
    fastserve family has no quantum), and a full-length step must not overflow to inf."""
    one = cost.decode_time(1, 1)
    if not (math.isfinite(one) and one > 0):
        raise ProfileError(f"{where}: a one-request decode step costs {one!r} s; it must be finite and > 0 "
                           f"(check 'decode_ms')")
    for what, seconds in ((f"a {_CHECK_LEN}-token prefill", cost.prefill_time(_CHECK_LEN)),
                          (f"a {_CHECK_BATCH}-request decode at {_CHECK_LEN} tokens each",
                           cost.decode_time(_CHECK_BATCH, _CHECK_BATCH * _CHECK_LEN))):
        if not math.isfinite(seconds):
            raise ProfileError(f"{where}: {what} costs {seconds!r} s; the coefficients overflow")


_CHECK_LEN = 2048  # the artifact's max_model_len
_CHECK_BATCH = 256


def load_profile(path: str | Path) -> HardwarePreset:
    """Read a ``jserve-cost-profile/1`` JSON file. Errors name the file and the field."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ProfileError(f"cannot read cost profile {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ProfileError(f"cost profile {path} is not UTF-8 text: {exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProfileError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    except RecursionError:
        raise ProfileError(f"{path}: not a cost profile (its JSON is nested too deeply to read)") from None
    return preset_from_dict(data, where=str(path))


def profile_dict(preset: HardwarePreset) -> dict:
    """The JSON-ready profile of a preset whose cost model is a ``FittedCostModel``."""
    cost = preset.cost
    if not isinstance(cost, FittedCostModel):
        raise ValueError(f"preset {preset.name!r}: only fitted cost models can be written as profiles")
    data = {
        "format": PROFILE_FORMAT,
        "name": preset.name,
        "prefill_ms": [cost.p0 * 1e3, cost.p1 * 1e3, cost.p2 * 1e3],
        "decode_ms": [cost.d0 * 1e3, cost.d1 * 1e3, cost.d2 * 1e3],
        "block_size": preset.block_size,
        "block_bytes": preset.block_bytes,
        "swap": {
            "bandwidth_bytes_per_s": preset.link_bandwidth,
            "latency_s": preset.link_latency,
            "full_duplex": preset.link_full_duplex,
        },
        "tp": preset.tp,
        "provenance": preset.provenance,
    }
    if isinstance(cost, MixedStepCostModel):
        data["mixed_decode_ms"] = [cost.m1 * 1e3, cost.m2 * 1e3]
        if cost.token_buckets or cost.seq_buckets:
            data["shape_buckets"] = {"tokens": list(cost.token_buckets), "sequences": list(cost.seq_buckets)}
        if cost.token_costs or cost.seq_costs:
            data["shape_costs_ms"] = {"tokens": [c * 1e3 for c in cost.token_costs],
                                      "sequences": [c * 1e3 for c in cost.seq_costs]}
    if preset.fixed_device_blocks is not None:
        data["num_device_blocks"] = preset.fixed_device_blocks
    if preset.model is not None and preset.gpu is not None:
        data["model"] = asdict(preset.model)
        data["device"] = asdict(preset.gpu)
    if preset.limits is not None:
        data["engine"] = asdict(preset.limits)
    return data


def save_profile(preset: HardwarePreset, path: str | Path) -> None:
    Path(path).write_text(json.dumps(profile_dict(preset), indent=2) + "\n")
