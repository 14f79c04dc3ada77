"""jserve models: Flax NNX Llama-family and OPT models over a paged KV cache, presets, and loading.

Public entry points: ``load(source, dtype=None)`` (preset name, Hugging Face directory or GGUF file) and
``greedy_generate(model, prompt_ids, max_new_tokens)``.
"""

from .config import PRESETS, ConfigError, ModelConfig, RopeScaling, get_preset
from .generate import greedy_generate
from .loading import from_config, load, smollm2_gguf_path
from .model import Model
from .paged import PageAllocator, SeqChunk, StepInputs, build_step

__all__ = [
    "PRESETS",
    "ConfigError",
    "ModelConfig",
    "RopeScaling",
    "get_preset",
    "greedy_generate",
    "from_config",
    "load",
    "smollm2_gguf_path",
    "Model",
    "PageAllocator",
    "SeqChunk",
    "StepInputs",
    "build_step",
]
