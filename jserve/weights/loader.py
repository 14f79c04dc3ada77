"""Fill a model's abstract NNX state from a checkpoint through a declared name map, with checks.

Flow: the model is built abstractly (``nnx.eval_shape``), its parameter paths and shapes are listed, and the
name map (``jserve.weights.namemap``) says which checkpoint tensor fills each path. Before any data moves,
the loader checks that every mapped tensor exists and that no checkpoint tensor is left over; then each
tensor is read (memory-mapped or dequantized), transformed (transpose, RoPE un-permutation), checked for
shape and dtype, cast to the model dtype and placed on the device.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .gguf_file import unpermute_rope_rows
from .namemap import TensorSpec

__all__ = ["WeightError", "TensorSource", "param_shapes", "state_from_arrays", "convert_tensors", "var_value"]


class WeightError(ValueError):
    """Weights do not fit the model: a missing, leftover or mis-shaped tensor (the message names it)."""


class TensorSource(Protocol):
    def keys(self) -> Iterable[str]: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def get(self, name: str) -> np.ndarray: ...


_FLOAT_KINDS = {np.dtype(np.float32), np.dtype(np.float16), np.dtype(np.float64), np.dtype(jnp.bfloat16)}


def var_value(v: Any) -> Any:
    return v.get_value() if hasattr(v, "get_value") else v.value


def param_shapes(abstract_state: nnx.State) -> dict[str, jax.ShapeDtypeStruct]:
    """``{"layers.0.self_attn.q_proj.kernel": ShapeDtypeStruct, ...}`` for an abstract model state."""
    return {".".join(map(str, path)): var_value(v) for path, v in nnx.to_flat_state(abstract_state)}


def state_from_arrays(abstract_state: nnx.State, arrays: dict[str, jax.Array]) -> nnx.State:
    """A concrete state with each parameter taken from ``arrays`` by path."""
    flat = []
    for path, v in nnx.to_flat_state(abstract_state):
        key = ".".join(map(str, path))
        if key not in arrays:
            raise WeightError(f"no value for model parameter {key!r}")
        flat.append((path, v.replace(arrays[key])))
    return nnx.from_flat_state(flat)


def _describe(source: TensorSource, name: str) -> str:
    file_of: Callable[[str], Path] | None = getattr(source, "file_of", None)
    where = file_of(name) if file_of else getattr(source, "path", None)
    return f"tensor {name!r}" + (f" in {where}" if where else "")


def convert_tensors(
    source: TensorSource,
    specs: list[TensorSpec],
    shapes: dict[str, jax.ShapeDtypeStruct],
    *,
    normalize: Callable[[str], str] = lambda n: n,
    ignorable: Callable[[str], bool] = lambda n: False,
    origin: str = "checkpoint",
) -> Iterable[tuple[str, np.ndarray]]:
    """Check the name map against the checkpoint, then yield ``(param path, converted numpy array)``.

    Arrays keep the checkpoint's floating dtype (cast happens on device); shapes are the model's.
    """
    spec_params = {s.param for s in specs}
    unmapped = sorted(set(shapes) - spec_params)
    if unmapped:
        raise WeightError(f"name map has no entry for model parameter(s) {unmapped[:5]}")
    unknown = sorted(spec_params - set(shapes))
    if unknown:  # its tensor would be read and then dropped, never reaching the model
        raise WeightError(f"name map fills parameter(s) {unknown[:5]} that the model does not have")
    names = {normalize(n): n for n in source.keys()}
    missing = [s.source for s in specs if s.source not in names]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise WeightError(f"missing tensor {missing[0]!r} in {origin}{more}")
    used = {s.source for s in specs}
    leftover = sorted(n for n in names if n not in used and not ignorable(n))
    if leftover:
        raise WeightError(
            f"unexpected tensor(s) left over in {origin}: {leftover[:5]}"
            + (f" (and {len(leftover) - 5} more)" if len(leftover) > 5 else "")
        )
    for s in specs:
        raw_name = names[s.source]
        arr = source.get(raw_name)
        if arr.dtype not in _FLOAT_KINDS:
            raise WeightError(f"{_describe(source, raw_name)} has dtype {arr.dtype}, expected a float type")
        if s.transpose:
            if arr.ndim != 2:
                raise WeightError(
                    f"{_describe(source, raw_name)} has shape {list(arr.shape)}, expected a 2-D weight"
                )
            arr = arr.T
        if s.unpermute_heads:
            arr = unpermute_rope_rows(arr.T, s.unpermute_heads).T if s.transpose else unpermute_rope_rows(
                arr, s.unpermute_heads
            )
        want = tuple(shapes[s.param].shape)
        if tuple(arr.shape) != want:
            got = list(arr.shape[::-1] if s.transpose else arr.shape)
            exp = list(want[::-1] if s.transpose else want)
            raise WeightError(
                f"{_describe(source, raw_name)} has shape {got}, expected {exp} for parameter {s.param}"
            )
        yield s.param, arr


def to_device(arr: np.ndarray, dtype: jnp.dtype) -> jax.Array:
    """Cast on the device (cheap for bf16 checkpoints loaded into bf16 models; no host round trip)."""
    if arr.dtype == np.float64:
        arr = arr.astype(np.float32)
    out = jax.device_put(arr)
    return out if out.dtype == np.dtype(dtype) else out.astype(dtype)
