"""Tokenizers from local files: a ``tokenizer.json``, a Hugging Face model directory, or a GGUF file.

``load_tokenizer(source)`` returns a :class:`Tokenizer` wrapping a ``tokenizers.Tokenizer`` plus the special
token ids and the chat template (from ``tokenizer_config.json`` or the GGUF ``tokenizer.chat_template`` key,
rendered with jinja2). For GGUF files the BPE vocabulary is rebuilt from the ``tokenizer.ggml.*`` metadata:
tokens, merges and token types (control / user-defined tokens become special added tokens), with the
byte-level pre-tokenizer that the file's ``tokenizer.ggml.pre`` names.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from pathlib import Path
from typing import Any, Sequence

import tokenizers
from tokenizers import decoders, models, pre_tokenizers

__all__ = ["Tokenizer", "TokenizerError", "load_tokenizer", "tokenizer_from_gguf_metadata"]


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # Python str holds no surrogate pairs: any is unpaired


class TokenizerError(ValueError):
    """A tokenizer source is missing, malformed or of an unsupported kind (the message names it)."""


@dataclasses.dataclass
class Tokenizer:
    """Text <-> token ids for one model, with its special tokens and chat template."""

    backend: tokenizers.Tokenizer
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    chat_template: str | None = None
    bos_token: str | None = None
    eos_token: str | None = None
    add_bos_token: bool = False  # prepend BOS when encode(..., add_special_tokens=True)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``; with ``add_special_tokens`` the model's BOS (if it uses one) is prepended,
        once: a text that already starts with the BOS token (a rendered chat template) gets no second one.
        Special-token strings in ``text`` (``<|im_start|>``) map to their ids."""
        if not isinstance(text, str):
            raise TypeError(f"encode() expects str text, got {type(text).__name__}")
        bad = _LONE_SURROGATE.search(text)
        if bad is not None:  # JSON's "\ud800" decodes to one; the backend would raise a bare TypeError
            raise TokenizerError(f"the text is not valid Unicode: a lone surrogate U+{ord(bad.group()):04X} at "
                                 f"character {bad.start()}")
        # tokenizer.json post-processors (Llama-2/3 templates) add BOS themselves; GGUF ones have none.
        ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        bos = self.bos_token_id
        if add_special_tokens and bos is not None:
            if self.add_bos_token and (not ids or ids[0] != bos):
                ids = [bos] + ids
            if ids[:2] == [bos, bos] and self.bos_token and text.startswith(self.bos_token):
                ids = ids[1:]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """The text of ``ids``. Invalid UTF-8 reads as U+FFFD, one per maximal invalid byte sequence, the same
        for every kind of tokenizer: a SentencePiece byte-fallback decoder alone turns a whole run of byte
        tokens (``<0xE2>``) that is not valid UTF-8 into one U+FFFD per byte, so "€" followed by the first
        byte of another character would decode to four U+FFFD, and text that decoded once could vanish when
        more ids follow (a stream's text would not extend). Such runs are repaired here before decoding:
        their bytes are replaced by the bytes of their lossy decoding ("€" and one U+FFFD)."""
        ids = [int(i) for i in ids]
        text = self.backend.decode(ids, skip_special_tokens=skip_special_tokens)
        if "\ufffd" in text and self._byte_pieces:
            repaired = self._valid_byte_runs(ids, skip_special_tokens)
            if repaired is not None:
                text = self.backend.decode(repaired, skip_special_tokens=False)
        return text

    @functools.cached_property
    def _byte_pieces(self) -> tuple[dict[int, int], list[int]] | None:
        """For a byte-fallback model with all 256 byte pieces: (piece id -> byte, byte -> piece id); else None."""
        if not getattr(self.backend.model, "byte_fallback", False):
            return None
        ids = [self.backend.token_to_id(f"<0x{b:02X}>") for b in range(256)]
        return None if None in ids else ({i: b for b, i in enumerate(ids)}, ids)

    def _valid_byte_runs(self, ids: list[int], skip_special_tokens: bool) -> list[int] | None:
        """``ids`` with every run of byte pieces that is not valid UTF-8 replaced by the pieces of its lossy
        decoding's bytes (special tokens dropped first when they are skipped: the decoder never sees them, so
        the bytes on either side form one run); None when every run is valid."""
        to_byte, to_piece = self._byte_pieces
        if skip_special_tokens:
            special = {i for i, t in self.backend.get_added_tokens_decoder().items() if t.special}
            ids = [i for i in ids if i not in special]
        out: list[int] = []
        run = bytearray()
        changed = False

        def flush() -> None:
            nonlocal changed
            try:
                run.decode("utf-8")
                good = bytes(run)
            except UnicodeDecodeError:
                good = run.decode("utf-8", errors="replace").encode("utf-8")
                changed = True
            out.extend(to_piece[b] for b in good)
            run.clear()

        for i in ids:
            b = to_byte.get(i)
            if b is not None:
                run.append(b)
                continue
            if run:
                flush()
            out.append(i)
        if run:
            flush()
        return out if changed else None

    def apply_chat_template(
        self,
        messages: list[dict[str, str]],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        chat_template: str | None = None,
    ) -> str | list[int]:
        """Render ``messages`` ([{"role", "content"}, ...]) with the model's chat template (jinja2), or with
        ``chat_template`` when given. A template that fails (its own ``raise_exception``, a jinja syntax or
        runtime error) raises ``TokenizerError``."""
        template = self.chat_template if chat_template is None else chat_template
        if template is not None and not isinstance(template, str):
            raise TokenizerError(f"chat_template must be a string (a jinja template), got {type(template).__name__}")
        if not template:
            raise TokenizerError("this tokenizer has no chat template (chat_template is empty)")
        from jinja2 import TemplateError
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])

        def raise_exception(message: str) -> None:
            raise TokenizerError(f"chat template error: {message}")

        env.globals["raise_exception"] = raise_exception
        try:
            text = env.from_string(template).render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        except TokenizerError:  # the template's own raise_exception
            raise
        except TemplateError as e:
            raise TokenizerError(f"chat template error: {type(e).__name__}: {e}") from e
        except Exception as e:  # a run-time error inside the template: {{ 1/0 }}, {{ 'a' + 1 }}
            raise TokenizerError(f"chat template error while rendering: {type(e).__name__}: {e}") from e
        return self.encode(text, add_special_tokens=False) if tokenize else text


# --------------------------------------------------------------------------------------------- loading


def load_tokenizer(source: str | os.PathLike) -> Tokenizer:
    """Load a tokenizer from a ``tokenizer.json`` file, a Hugging Face directory or a ``.gguf`` file."""
    path = Path(source)
    if not path.exists():
        raise TokenizerError(f"tokenizer source not found: {path}")
    if path.is_dir():
        tj = path / "tokenizer.json"
        if not tj.is_file():
            raise TokenizerError(f"no tokenizer.json in model directory {path}")
        return _from_tokenizer_json(tj, path / "tokenizer_config.json")
    if path.suffix == ".gguf":
        return _from_gguf(path)
    if path.suffix == ".json":
        return _from_tokenizer_json(path, path.with_name("tokenizer_config.json"))
    raise TokenizerError(f"unsupported tokenizer source {path}: expected a directory, tokenizer.json or .gguf")


def _token_content(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _chat_template(value: Any, config_path: Path) -> str | None:
    """``chat_template`` of a tokenizer_config.json: a string, or named templates (the "default" one)."""
    if isinstance(value, list) and all(isinstance(t, dict) for t in value):
        value = next((t.get("template") for t in value if t.get("name") == "default"), None)
    if value is not None and not isinstance(value, str):
        raise TokenizerError(f"{config_path}: chat_template must be a string or a list of "
                             f"{{\"name\", \"template\"}} objects, got {json.dumps(value)[:60]}")
    return value


def _from_tokenizer_json(path: Path, config_path: Path) -> Tokenizer:
    try:
        backend = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON
        raise TokenizerError(f"cannot parse tokenizer file {path}: {e}") from e
    config: dict[str, Any] = {}
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text())
        except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, nested too deeply
            raise TokenizerError(f"cannot parse {config_path}: {e}") from e
        if not isinstance(config, dict):
            raise TokenizerError(f"{config_path}: expected a JSON object")
    bos = _token_content(config.get("bos_token"))
    eos = _token_content(config.get("eos_token"))
    template = _chat_template(config.get("chat_template"), config_path)
    chat_file = config_path.with_name("chat_template.jinja")
    if template is None and chat_file.is_file():
        try:
            template = chat_file.read_text()
        except UnicodeDecodeError as e:
            raise TokenizerError(f"cannot read {chat_file}: {e}") from e
    return Tokenizer(
        backend=backend,
        bos_token_id=backend.token_to_id(bos) if bos else None,
        eos_token_id=backend.token_to_id(eos) if eos else None,
        chat_template=template,
        bos_token=bos,
        eos_token=eos,
        add_bos_token=bool(config.get("add_bos_token", False)),
    )


# GGUF token types (llama.cpp's llama_token_type).
_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4

# Pre-tokenizer regexes by tokenizer.ggml.pre (the subset of llama.cpp's table that jserve's models use).
_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
_INDIVIDUAL_DIGIT_PRES = {"smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva"}


def _byte_level_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    def split_then_bytes(regex: str) -> pre_tokenizers.PreTokenizer:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(tokenizers.Regex(regex), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )

    if pre in _INDIVIDUAL_DIGIT_PRES:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    if pre in ("llama-bpe", "llama3", "smaug-bpe"):
        return split_then_bytes(_LLAMA3_REGEX)
    if pre == "qwen2":
        return split_then_bytes(_QWEN2_REGEX)
    if pre in ("default", "gpt2", "gpt-2", "mpt", "olmo", "jais", ""):
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    raise TokenizerError(f"unsupported GGUF pre-tokenizer tokenizer.ggml.pre = {pre!r}")


def _from_gguf(path: Path) -> Tokenizer:
    from jserve.weights.gguf_file import read_gguf_metadata

    return tokenizer_from_gguf_metadata(read_gguf_metadata(path), source=str(path))


def tokenizer_from_gguf_metadata(meta: dict[str, Any], source: str = "gguf") -> Tokenizer:
    """Rebuild the BPE tokenizer from GGUF ``tokenizer.ggml.*`` fields (already parsed)."""
    path = source
    kind = meta.get("tokenizer.ggml.model")
    if kind is None:
        raise TokenizerError(f"GGUF file {path} has no tokenizer (missing field tokenizer.ggml.model)")
    if kind != "gpt2":
        raise TokenizerError(
            f"unsupported GGUF tokenizer model tokenizer.ggml.model = {kind!r} in {path} (only BPE 'gpt2')"
        )
    tokens: list[str] = meta.get("tokenizer.ggml.tokens") or []
    merges: list[str] = meta.get("tokenizer.ggml.merges") or []
    if not tokens or not merges:
        raise TokenizerError(f"GGUF file {path} lacks tokenizer.ggml.tokens or tokenizer.ggml.merges")
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    vocab = {tok: i for i, tok in enumerate(tokens)}
    pairs = []
    for m in merges:
        a, sep, b = m.partition(" ")
        if not sep:
            raise TokenizerError(f"malformed merge {m!r} in tokenizer.ggml.merges of {path}")
        pairs.append((a, b))
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    backend.pre_tokenizer = _byte_level_pre_tokenizer(str(meta.get("tokenizer.ggml.pre", "default")))
    backend.decoder = decoders.ByteLevel()
    special = [
        tokenizers.AddedToken(tok, special=True, normalized=False)
        for tok, t in zip(tokens, types)
        if t in (_TOKEN_CONTROL, _TOKEN_USER_DEFINED)
    ]
    backend.add_special_tokens(special)

    def token_id(key: str) -> int | None:
        v = meta.get(key)
        return int(v) if v is not None else None

    bos_id, eos_id = token_id("tokenizer.ggml.bos_token_id"), token_id("tokenizer.ggml.eos_token_id")
    return Tokenizer(
        backend=backend,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        chat_template=meta.get("tokenizer.chat_template"),
        bos_token=tokens[bos_id] if bos_id is not None and bos_id < len(tokens) else None,
        eos_token=tokens[eos_id] if eos_id is not None and eos_id < len(tokens) else None,
        add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
    )
