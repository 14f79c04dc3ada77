"""Turn a model's abstract state into real parameters: dummy random init, Hugging Face safetensors or GGUF.

Every function takes the config and the abstract ``nnx.State`` (from ``nnx.eval_shape``) and returns a
concrete state on the default device. Dummy init runs as one jitted program on the device (no host copy),
so multi-GB presets initialise in seconds on a GPU. Real checkpoints go through the name map and checks in
``loader``; GGUF (and, on request, safetensors) conversions are cached in tensorstore (``cache``).
"""

from __future__ import annotations

import functools
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


from . import namemap
from .cache import WeightCache, cache_key, default_cache_dir
from .gguf_file import GGUFTensors
from .loader import convert_tensors, param_shapes, state_from_arrays, to_device
from .safetensors_file import SafetensorsCheckpoint, find_safetensors

if TYPE_CHECKING:  # jserve.models imports this package; keep the runtime dependency one way
    from jserve.models.config import ModelConfig

__all__ = ["dummy_state", "hf_state", "gguf_state", "LoadStats"]


class LoadStats(dict):
    """Timings of one load: ``seconds``, ``cache`` ("hit" | "miss" | "off")."""


@functools.partial(jax.jit, static_argnames=("shape", "dtype"))
def _normal(key: jax.Array, index: jax.Array, shape: tuple[int, ...], dtype: jnp.dtype) -> jax.Array:
    return (0.02 * jax.random.normal(jax.random.fold_in(key, index), shape, jnp.float32)).astype(dtype)


def dummy_state(abstract_state: nnx.State, seed: int = 0) -> nnx.State:
    """Random weights made on the device: normal(0, 0.02) matrices, unit norm scales, zero biases.
    One small program per distinct (shape, dtype), so compiling stays cheap however deep the model is."""
    shapes = param_shapes(abstract_state)
    key = jax.random.key(seed)
    arrays = {}
    for i, p in enumerate(sorted(shapes)):
        sd = shapes[p]
        if p.endswith(".weight"):  # RMSNorm / LayerNorm scales
            arrays[p] = jnp.ones(sd.shape, sd.dtype)
        elif p.endswith(".bias"):
            arrays[p] = jnp.zeros(sd.shape, sd.dtype)
        else:
            arrays[p] = _normal(key, jnp.uint32(i), tuple(sd.shape), jnp.dtype(sd.dtype))
    return state_from_arrays(abstract_state, arrays)


def _resolve_cache(cache: bool | str | Path | None, default_on: bool) -> Path | None:
    if cache is None:
        cache = default_on
    if cache is False:
        return None
    if cache is True:
        return default_cache_dir()
    return Path(cache)


def _load_via_cache(
    files: list[Path],
    cfg: ModelConfig,
    abstract_state: nnx.State,
    cache_dir: Path | None,
    convert,  # () -> iterable of (param, np.ndarray)
    stats: LoadStats,
) -> nnx.State:
    t0 = time.perf_counter()
    dtype = jnp.dtype(cfg.dtype)
    if cache_dir is not None:
        entry = WeightCache(cache_dir, cache_key(files, cfg.dtype, extra=repr(cfg)))
        if entry.exists():
            try:
                host = entry.read()
            except Exception as e:  # the cache is derived data: a damaged entry is converted again
                warnings.warn(f"weight cache entry {entry.dir} is unreadable ({type(e).__name__}: {e}); converting "
                              "the weights again and rewriting it", stacklevel=2)
                host = {}
            shapes = param_shapes(abstract_state)
            if set(host) == set(shapes):
                arrays = {p: to_device(a, dtype) for p, a in host.items()}
                stats.update(cache="hit", seconds=time.perf_counter() - t0, cache_dir=str(entry.dir))
                return state_from_arrays(abstract_state, arrays)
        host = dict(convert())
        arrays = {p: to_device(a, dtype) for p, a in host.items()}
        try:
            entry.write(host, cfg.dtype)
            stats.update(cache="miss", seconds=time.perf_counter() - t0, cache_dir=str(entry.dir))
        except Exception as e:  # an unwritable cache costs the next load a conversion, not this load its model
            warnings.warn(f"cannot write the weight cache {entry.dir} ({type(e).__name__}: {e}); the model is "
                          "loaded without caching", stacklevel=2)
            stats.update(cache="off", seconds=time.perf_counter() - t0)
        return state_from_arrays(abstract_state, arrays)
    arrays = {p: to_device(a, dtype) for p, a in convert()}
    stats.update(cache="off", seconds=time.perf_counter() - t0)
    return state_from_arrays(abstract_state, arrays)


def hf_state(
    cfg: ModelConfig,
    abstract_state: nnx.State,
    model_dir: str | Path,
    *,
    cache: bool | str | Path | None = None,
    stats: LoadStats | None = None,
) -> nnx.State:
    """Parameters from a Hugging Face directory's safetensors (single or sharded). Cache off by default:
    safetensors are memory-mapped and already in a loadable dtype."""
    model_dir = Path(model_dir)
    files = find_safetensors(model_dir)
    ckpt = SafetensorsCheckpoint(files)
    shapes = param_shapes(abstract_state)

    def convert():
        return convert_tensors(
            ckpt,
            namemap.hf_name_map(cfg),
            shapes,
            normalize=lambda n: namemap.normalize_hf_name(cfg, n),
            ignorable=lambda n: namemap.hf_ignorable(cfg, n),
            origin=str(model_dir),
        )

    return _load_via_cache(files, cfg, abstract_state, _resolve_cache(cache, False), convert,
                           stats if stats is not None else LoadStats())


def gguf_state(
    cfg: ModelConfig,
    abstract_state: nnx.State,
    gguf_path: str | Path,
    *,
    tensors: GGUFTensors | None = None,
    cache: bool | str | Path | None = None,
    stats: LoadStats | None = None,
) -> nnx.State:
    """Parameters from a GGUF file, dequantized to float32 then cast; cached in tensorstore by default."""
    gguf_path = Path(gguf_path)
    shapes = param_shapes(abstract_state)

    def convert():
        src = tensors if tensors is not None else GGUFTensors(gguf_path)
        return convert_tensors(
            src,
            namemap.gguf_name_map(cfg),
            shapes,
            ignorable=lambda n: namemap.gguf_ignorable(cfg, n),
            origin=str(gguf_path),
        )

    return _load_via_cache([gguf_path], cfg, abstract_state, _resolve_cache(cache, True), convert,
                           stats if stats is not None else LoadStats())


def host_arrays(state: nnx.State) -> dict[str, np.ndarray]:
    """Parameters of a concrete state as host numpy arrays, by path (for tests and exports)."""
    return {p: np.asarray(v) for p, v in param_shapes(state).items()}
