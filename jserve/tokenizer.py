"""Tokenizers from local files: a ``tokenizer.json``, a Hugging Face model directory, or a GGUF file.

``load_tokenizer(source)`` returns a :class:`Tokenizer` wrapping a ``tokenizers.Tokenizer`` plus the special
token ids and the chat template (from ``chat_template.jinja`` or ``tokenizer_config.json``, or the GGUF
``tokenizer.chat_template`` key; rendered with jinja2 as transformers renders it). For GGUF files the BPE
vocabulary is rebuilt from the ``tokenizer.ggml.*`` metadata: tokens, merges and token types (control /
user-defined tokens become special added tokens), with the byte-level pre-tokenizer that the file's
``tokenizer.ggml.pre`` names.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

__all__ = ["Tokenizer", "TokenizerError", "check_template_kwargs", "load_tokenizer", "tokenizer_from_gguf_metadata"]


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
    # the named special tokens a chat template sees (bos_token ... mask_token, those the source names), and the
    # named chat templates ({"default": ..., "tool_use": ...}) when the source has several
    special_tokens: dict[str, str] = dataclasses.field(default_factory=dict)
    chat_templates: dict[str, str] = dataclasses.field(default_factory=dict)

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
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        chat_template: str | None = None,
        *,
        tools: list[dict[str, Any]] | None = None,
        documents: list[dict[str, Any]] | None = None,
        **template_kwargs: Any,
    ) -> str | list[int]:
        """Render ``messages`` ([{"role", "content"}, ...]) with the model's chat template (jinja2, sandboxed), or
        with ``chat_template`` (a template, or the name of one of the model's named templates), as transformers'
        ``apply_chat_template(..., tokenize=False)`` renders it: the template sees ``messages`` (keys whose value
        is None dropped; a reasoning text also under ``reasoning_content`` and ``thinking``),
        ``tools`` and ``documents`` (None unless given: lists of JSON-schema / document dicts; with tools the
        model's ``tool_use`` template is chosen when it has one), ``add_generation_prompt``, the tokenizer's
        named special tokens (``bos_token``, ``eos_token``, ``unk_token``, ``pad_token``...; those it has), and
        ``template_kwargs`` (``enable_thinking=False``, ``date_string=...``; they override special tokens), with
        transformers' ``tojson`` filter (no HTML escaping, keys in order), ``strftime_now`` and
        ``raise_exception``. Unlike transformers, ``add_generation_prompt`` defaults to True. A template that
        fails (its own ``raise_exception``, a jinja syntax or run-time error) raises ``TokenizerError``."""
        template = self._select_chat_template(chat_template, tools)
        for name, value in (("tools", tools), ("documents", documents)):
            if value is not None and not (isinstance(value, (list, tuple)) and all(isinstance(v, dict) for v in value)):
                raise TokenizerError(f"{name} must be a list of dicts, got {value!r:.80}")
        context = dict(self.special_tokens)
        if self.bos_token is not None:
            context["bos_token"] = self.bos_token
        if self.eos_token is not None:
            context["eos_token"] = self.eos_token
        context.update(_plain(template_kwargs))  # the caller's values win, as in transformers
        from jinja2 import TemplateError

        try:
            text = _compile_chat_template(template).render(
                messages=_template_messages(messages),
                tools=_plain(None if tools is None else list(tools)),
                documents=_plain(None if documents is None else list(documents)),
                add_generation_prompt=add_generation_prompt,
                **context,
            )
        except TokenizerError:  # the template's own raise_exception
            raise
        except TemplateError as e:
            raise TokenizerError(f"chat template error: {type(e).__name__}: {e}") from e
        except Exception as e:  # a run-time error inside the template: {{ 1/0 }}, {{ 'a' + 1 }}
            raise TokenizerError(f"chat template error while rendering: {type(e).__name__}: {e}") from e
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def _select_chat_template(self, chat_template: str | None, tools: Any) -> str:
        """The template to render: ``chat_template`` (a template, or a named template's name), else with tools
        the ``tool_use`` named template, else the model's default one (transformers' ``get_chat_template``)."""
        if chat_template is not None and not isinstance(chat_template, str):
            raise TokenizerError(f"chat_template must be a string (a jinja template), got "
                                 f"{type(chat_template).__name__}")
        if chat_template is not None:
            template = self.chat_templates.get(chat_template, chat_template)
        elif tools is not None and "tool_use" in self.chat_templates:
            template = self.chat_templates["tool_use"]
        else:
            template = self.chat_template
        if not template:
            named = f" (its named templates: {', '.join(sorted(self.chat_templates))})" if self.chat_templates else ""
            raise TokenizerError(f"this tokenizer has no chat template (chat_template is empty){named}")
        return template


# The named special tokens transformers hands a chat template (its SPECIAL_TOKENS_ATTRIBUTES).
_SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# The names a message's reasoning goes under; a template reads one of them (transformers fills all three).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


# apply_chat_template's own parameters: a template keyword of one of these names would collide with them
_RESERVED_TEMPLATE_KWARGS = ("messages", "add_generation_prompt", "tokenize", "chat_template", "tools", "documents")


def check_template_kwargs(kwargs: Any) -> dict[str, Any]:
    """``chat_template_kwargs`` (extra variables for the chat template, vLLM's name: ``{"enable_thinking":
    false}``) if it is a dict of them, else a ``TokenizerError`` naming the problem. {} for None."""
    if kwargs is None:
        return {}
    if not isinstance(kwargs, Mapping):
        raise TokenizerError(f"chat_template_kwargs must be a dict of template variables, got {type(kwargs).__name__}")
    for key in kwargs:
        if not isinstance(key, str) or not key.isidentifier():
            raise TokenizerError(f"chat_template_kwargs: {key!r} is not a template variable name")
        if key in _RESERVED_TEMPLATE_KWARGS:
            raise TokenizerError(f"chat_template_kwargs may not set {key!r}: it is a parameter of its own")
    return dict(kwargs)


def _plain(value: Any) -> Any:
    """``value`` rebuilt from plain JSON types, as transformers rebuilds everything a template sees: a template
    from the Hub is untrusted code, and a rich object's methods (a file's ``write``) are open to it in the
    sandbox. Subclasses of str / int / float become the base type, dataclasses and pydantic models dicts,
    numpy scalars Python ones, anything else a placeholder naming its type (``"<ndarray>"``)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, np.generic):
        return _plain(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _template_messages(messages: Any) -> list[dict[str, Any]]:
    """The messages a chat template sees, as transformers passes them: plain copies (``_plain``) without the
    keys whose value is None (an OpenAI ``"content": null`` or ``"tool_calls": null`` is absent, not the string
    "None"), and a message's reasoning (its first of ``reasoning_content``, ``thinking``, ``reasoning``) also
    under ``reasoning_content`` and, unless it has one, ``thinking``."""
    if not isinstance(messages, (list, tuple)):
        raise TokenizerError(f"messages must be a list of dicts, got {type(messages).__name__}")
    out = []
    for j, m in enumerate(_plain(list(messages))):
        if not isinstance(m, dict):
            raise TokenizerError(f"message {j} must be a dict, got {m!r:.80}")
        m = {k: v for k, v in m.items() if v is not None}
        reasoning = next((m[k] for k in _REASONING_FIELDS if k in m), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | str | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    """transformers' ``tojson`` filter: plain ``json.dumps`` (jinja's own escapes HTML and sorts the keys)."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    """The local date/time formatted (Llama 3.x templates date their system prompt with it)."""
    return datetime.now().strftime(fmt)


def _raise_exception(message: str) -> None:
    raise TokenizerError(f"chat template error: {message}")


@functools.lru_cache(maxsize=32)
def _compile_chat_template(template: str):
    """``template`` compiled in a sandboxed jinja environment set up as transformers sets up its own (cached:
    the server renders the same template for every request)."""
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


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


def _named_templates(value: Any, config_path: Path) -> dict[str, str]:
    """``chat_template`` of a tokenizer_config.json as named templates: a string is the "default" one; a list of
    ``{"name", "template"}`` objects names each."""
    if value is None:
        return {}
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list) and all(isinstance(t, dict) and isinstance(t.get("name"), str)
                                       and isinstance(t.get("template"), str) for t in value):
        return {t["name"]: t["template"] for t in value}
    raise TokenizerError(f"{config_path}: chat_template must be a string or a list of "
                         f"{{\"name\", \"template\"}} objects, got {json.dumps(value)[:60]}")


def _read_template(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError) as e:
        raise TokenizerError(f"cannot read {path}: {e}") from e


def _chat_templates(config: dict[str, Any], config_path: Path) -> dict[str, str]:
    """A model directory's named chat templates, found as transformers finds them: ``chat_template.jinja`` (the
    "default" one) and ``additional_chat_templates/NAME.jinja`` replace tokenizer_config.json's ``chat_template``
    when there are any."""
    directory = config_path.parent
    files: dict[str, str] = {}
    if (directory / "chat_template.jinja").is_file():
        files["default"] = _read_template(directory / "chat_template.jinja")
    extra = directory / "additional_chat_templates"
    if extra.is_dir():
        for f in sorted(extra.glob("*.jinja")):
            files[f.name.removesuffix(".jinja")] = _read_template(f)
    named = _named_templates(config.get("chat_template"), config_path)  # checked even when the files win
    return files or named


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
    special = {name: tok for name in _SPECIAL_TOKEN_NAMES
               if (tok := _token_content(config.get(name))) is not None}
    bos, eos = special.get("bos_token"), special.get("eos_token")
    templates = _chat_templates(config, config_path)
    return Tokenizer(
        backend=backend,
        bos_token_id=backend.token_to_id(bos) if bos else None,
        eos_token_id=backend.token_to_id(eos) if eos else None,
        chat_template=templates.get("default"),
        bos_token=bos,
        eos_token=eos,
        add_bos_token=bool(config.get("add_bos_token", False)),
        special_tokens=special,
        chat_templates=templates if set(templates) != {"default"} else {},
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
    unknown = next(((a, b) for a, b in pairs if a not in vocab or b not in vocab or a + b not in vocab), None)
    if unknown is not None:  # the tokenizers library raises a bare Exception naming neither file nor merge
        raise TokenizerError(f"merge {' '.join(unknown)!r} in tokenizer.ggml.merges of {path} names a token that "
                             "is not in tokenizer.ggml.tokens")
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

    def token(key: str) -> str | None:
        i = token_id(key)
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    bos_id, eos_id = token_id("tokenizer.ggml.bos_token_id"), token_id("tokenizer.ggml.eos_token_id")
    # the special tokens transformers' GGUF conversion names (it reads these four ids)
    special = {name: tok for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                                           ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id"))
               if (tok := token(f"tokenizer.ggml.{key}")) is not None}
    return Tokenizer(
        backend=backend,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        chat_template=meta.get("tokenizer.chat_template"),
        bos_token=special.get("bos_token"),
        eos_token=special.get("eos_token"),
        add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        special_tokens=special,
    )
