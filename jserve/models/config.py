"""``ModelConfig``: the architecture hyper-parameters of one model, from a named preset, a Hugging Face
``config.json`` or GGUF metadata.

Two families are supported: ``"llama"`` (Llama-2/3, Mistral, Qwen2, SmolLM2: RMSNorm, rotary positions,
SwiGLU, optional grouped-query attention, QKV bias and tied embeddings) and ``"opt"`` (learned positions with
an offset of 2, LayerNorm before or after each block, ReLU MLP, optional project_in/out).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

__all__ = ["ConfigError", "RopeScaling", "ModelConfig", "PRESETS", "get_preset", "SUPPORTED_ARCHITECTURES"]


class ConfigError(ValueError):
    """A model configuration is missing, malformed or unsupported (the message names the field or file)."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling: ``"linear"`` (positions / factor) or ``"llama3"`` (Llama-3.1 smooth band)."""

    rope_type: str
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    architecture: str  # "llama" | "opt"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int = 2048
    norm_eps: float = 1e-5
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    dtype: str = "float32"  # parameter and activation dtype; logits are always float32
    name: str = "custom"
    # Llama family
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    qkv_bias: bool = False  # Qwen2: bias on q/k/v only
    o_bias: bool = False  # Llama attention_bias: bias on o_proj too
    mlp_bias: bool = False
    # Mistral / Qwen2 sliding-window attention (None: full attention). jserve computes full attention only,
    # which equals sliding-window attention for sequences no longer than the window, so a window smaller than
    # max_position_embeddings caps it: max_position_embeddings is the context jserve serves (the engine's
    # default and largest max_model_len; see jserve.engine.config.resolve_max_model_len).
    sliding_window: int | None = None
    # OPT
    do_layer_norm_before: bool = True
    word_embed_proj_dim: int | None = None  # != hidden_size -> project_in / project_out
    enable_bias: bool = True
    remove_final_layer_norm: bool = False
    position_offset: int = 2
    # tokens
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    # further end-of-sequence ids: the rest of a config.json ``eos_token_id`` list and generation_config.json's
    # (Llama-3 Instruct ends a turn with <|eot_id|> and a tool call with <|eom_id|>, not with eos_token_id)
    extra_eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"unsupported architecture {self.architecture!r}; supported: {sorted(SUPPORTED_ARCHITECTURES)}"
            )
        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                  "head_dim"):
            v = getattr(self, f)
            if not isinstance(v, int) or v <= 0:
                raise ConfigError(f"ModelConfig.{f} must be a positive int, got {v!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"ModelConfig.dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.hidden_act not in ("silu", "relu", "gelu", "gelu_new"):
            raise ConfigError(f"unsupported hidden_act {self.hidden_act!r}")
        if not isinstance(self.max_position_embeddings, int) or self.max_position_embeddings < 2:
            raise ConfigError(
                f"ModelConfig.max_position_embeddings must be an int >= 2 (a prompt token and one generated token), "
                f"got {self.max_position_embeddings!r}"
            )
        if not (isinstance(self.rope_theta, (int, float)) and math.isfinite(self.rope_theta) and self.rope_theta > 0):
            raise ConfigError(f"ModelConfig.rope_theta must be a finite number > 0, got {self.rope_theta!r}")
        if self.sliding_window is not None:
            w = self.sliding_window
            if isinstance(w, bool) or not isinstance(w, int) or w < 2:
                raise ConfigError(f"ModelConfig.sliding_window must be None or an int >= 2, got {w!r}")
            if self.architecture != "llama":
                raise ConfigError(
                    f"ModelConfig.sliding_window applies to the llama family only, not {self.architecture}"
                )
            if w < self.max_position_embeddings:  # full attention is exact only within the window
                object.__setattr__(self, "max_position_embeddings", w)

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """Every id that ends a sequence: ``eos_token_id`` and ``extra_eos_token_ids``."""
        return frozenset(i for i in (self.eos_token_id, *self.extra_eos_token_ids) if i is not None)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------------------------------- sizes
    def param_count(self) -> int:
        """Number of parameters (tied embeddings counted once)."""
        h, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        if self.architecture == "llama":
            attn = h * (q + 2 * kv) + q * h + (q + 2 * kv) * self.qkv_bias + h * self.o_bias
            mlp = 3 * h * f + (2 * f + h) * self.mlp_bias
            layer = attn + mlp + 2 * h
            total = self.num_layers * layer + v * h + h + (0 if self.tie_word_embeddings else v * h)
        else:
            e = self.word_embed_proj_dim or h
            attn = 4 * h * h + 4 * h
            mlp = 2 * h * f + f + h
            layer = attn + mlp + 4 * h
            total = self.num_layers * layer + v * e + (self.max_position_embeddings + self.position_offset) * h
            total += 2 * h + (2 * h * e if e != h else 0) + (0 if self.tie_word_embeddings else v * e)
        return int(total)

    def kv_bytes_per_token(self, kv_dtype_bytes: int | None = None) -> int:
        b = kv_dtype_bytes or (4 if self.dtype == "float32" else 2)
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * b

    # ------------------------------------------------------------------------------------- constructors
    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        """Build from a Hugging Face ``config.json`` dict (transformers 4.x and 5.x field names).

        Every field is checked for its type as it is read, and every error names ``source`` and the field:
        counts must be integers (a float with an integral value such as ``64.0`` is taken, ``64.9``, ``"64"``
        and ``true`` are not), flags JSON booleans, token ids non-negative integers."""
        model_type = cfg.get("model_type")
        if model_type not in ("llama", "mistral", "qwen2", "opt"):
            raise ConfigError(
                f"{source}: unsupported model_type {model_type!r} (architectures {cfg.get('architectures') or []}); "
                "supported: llama, mistral, qwen2, opt"
            )
        dtype = _hf_dtype(cfg.get("dtype", cfg.get("torch_dtype")))
        ids = dict(bos_token_id=_first_id(_token_ids(cfg, "bos_token_id", source)),
                   eos_token_id=_first_id(_token_ids(cfg, "eos_token_id", source)),
                   extra_eos_token_ids=tuple(_token_ids(cfg, "eos_token_id", source)[1:]))
        if model_type in ("llama", "mistral", "qwen2"):
            heads = _int_field(cfg, "num_attention_heads", source)
            hidden = _int_field(cfg, "hidden_size", source)
            rope = _dict_field(cfg, "rope_parameters", source)
            scaling_key = "rope_scaling" if cfg.get("rope_scaling") else "rope_parameters"
            scaling_dict = _dict_field(cfg, "rope_scaling", source) or rope
            if "rope_theta" in cfg:
                theta = _float_field(cfg, "rope_theta", source, 10000.0)
            else:
                theta = _float_field(rope, "rope_theta", source, 10000.0, name="rope_parameters.rope_theta")
            scaling = _rope_scaling(scaling_dict, source, scaling_key)
            for where, d in (("", cfg), ("rope_parameters.", rope), ("rope_scaling.", scaling_dict)):
                partial = d.get("partial_rotary_factor")
                if partial is not None and partial != 1:
                    raise ConfigError(f"{source}: field '{where}partial_rotary_factor' is {partial!r}: partial "
                                      "rotary embeddings are not supported")
            attention_bias = _bool_field(cfg, "attention_bias", source, False)
            qkv_bias = model_type == "qwen2" or attention_bias
            return cls._checked(
                source,
                architecture="llama",
                name=str(cfg.get("_name_or_path") or model_type),
                vocab_size=_int_field(cfg, "vocab_size", source),
                hidden_size=hidden,
                intermediate_size=_int_field(cfg, "intermediate_size", source),
                num_layers=_int_field(cfg, "num_hidden_layers", source),
                num_heads=heads,
                num_kv_heads=_int_field(cfg, "num_key_value_heads", source, default=heads, none_is_default=True),
                head_dim=_int_field(cfg, "head_dim", source, default=hidden // heads, none_is_default=True),
                max_position_embeddings=_int_field(cfg, "max_position_embeddings", source, default=2048, minimum=2),
                norm_eps=_float_field(cfg, "rms_norm_eps", source, 1e-6),
                hidden_act=str(cfg.get("hidden_act", "silu")),
                tie_word_embeddings=_bool_field(cfg, "tie_word_embeddings", source, False),
                rope_theta=theta,
                rope_scaling=scaling,
                qkv_bias=qkv_bias,
                o_bias=model_type != "qwen2" and attention_bias,
                mlp_bias=_bool_field(cfg, "mlp_bias", source, False),
                sliding_window=_hf_sliding_window(cfg, model_type, source),
                dtype=dtype,
                **ids,
            )
        else:  # opt
            hidden = _int_field(cfg, "hidden_size", source)
            heads = _int_field(cfg, "num_attention_heads", source)
            if hidden % heads:
                raise ConfigError(f"{source}: field 'hidden_size' ({hidden}) must be a multiple of "
                                  f"'num_attention_heads' ({heads})")
            act = str(cfg.get("activation_function", "relu"))
            return cls._checked(
                source,
                architecture="opt",
                name=str(cfg.get("_name_or_path") or "opt"),
                vocab_size=_int_field(cfg, "vocab_size", source),
                hidden_size=hidden,
                intermediate_size=_int_field(cfg, "ffn_dim", source),
                num_layers=_int_field(cfg, "num_hidden_layers", source),
                num_heads=heads,
                num_kv_heads=heads,
                head_dim=hidden // heads,
                max_position_embeddings=_int_field(cfg, "max_position_embeddings", source, default=2048, minimum=2),
                norm_eps=1e-5,
                hidden_act=act,
                tie_word_embeddings=_bool_field(cfg, "tie_word_embeddings", source, True),  # OPTConfig's default
                do_layer_norm_before=_bool_field(cfg, "do_layer_norm_before", source, True),
                word_embed_proj_dim=_int_field(cfg, "word_embed_proj_dim", source, default=hidden,
                                               none_is_default=True),
                enable_bias=_bool_field(cfg, "enable_bias", source, True),
                remove_final_layer_norm=_bool_field(cfg, "_remove_final_layer_norm", source, False),
                dtype=dtype,
                **ids,
            )

    @classmethod
    def _checked(cls, source: str, **fields: Any) -> "ModelConfig":
        """``cls(**fields)`` with the checks of ``__post_init__`` naming ``source`` too."""
        try:
            return cls(**fields)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if not path.is_dir():
            raise ConfigError(f"model directory not found: {path}")
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            raise ConfigError(f"no config.json in model directory {path}")
        try:
            cfg = json.loads(cfg_path.read_text())
        except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, nested too deeply
            raise ConfigError(f"cannot parse {cfg_path}: {e}") from e
        if not isinstance(cfg, dict):
            raise ConfigError(f"{cfg_path}: expected a JSON object")
        out = cls.from_hf_dict(cfg, source=str(cfg_path))
        gen = _generation_eos_ids(path / "generation_config.json")
        extra = tuple(dict.fromkeys(i for i in (*out.extra_eos_token_ids, *gen) if i != out.eos_token_id))
        return out.replace(extra_eos_token_ids=extra) if extra != out.extra_eos_token_ids else out

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any], source: str = "gguf") -> "ModelConfig":
        """Build from GGUF key/value metadata (``general.architecture`` = llama)."""
        arch = meta.get("general.architecture")
        if arch != "llama":
            raise ConfigError(f"{source}: unsupported GGUF general.architecture {arch!r} (supported: llama)")

        def need(key: str) -> Any:
            full = f"{arch}.{key}"
            if meta.get(full) is None:
                raise ConfigError(f"{source}: missing GGUF field {full!r}")
            return meta[full]

        hidden = int(need("embedding_length"))
        heads = int(need("attention.head_count"))
        tokens = meta.get("tokenizer.ggml.tokens")
        vocab = int(meta.get(f"{arch}.vocab_size") or (len(tokens) if tokens else 0))
        if not vocab:
            raise ConfigError(f"{source}: missing GGUF field '{arch}.vocab_size'")
        head_dim = int(meta.get(f"{arch}.attention.key_length") or hidden // heads)
        rotary = meta.get(f"{arch}.rope.dimension_count")
        if rotary is not None and rotary != head_dim:
            raise ConfigError(
                f"{source}: GGUF field '{arch}.rope.dimension_count' is {rotary!r}, not the head dimension "
                f"{head_dim}: partial rotary embeddings are not supported"
            )
        window = meta.get(f"{arch}.attention.sliding_window")
        return cls._checked(
            source,
            architecture="llama",
            name=str(meta.get("general.name", "gguf")),
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=int(need("feed_forward_length")),
            num_layers=int(need("block_count")),
            num_heads=heads,
            num_kv_heads=int(meta.get(f"{arch}.attention.head_count_kv") or heads),
            head_dim=head_dim,
            max_position_embeddings=int(meta.get(f"{arch}.context_length", 2048)),
            norm_eps=float(meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
            rope_scaling=_gguf_rope_scaling(meta, arch, source),
            # llama.cpp: 0 is no window; a window caps the context (see the field's comment)
            sliding_window=int(window) if window else None,
            tie_word_embeddings=False,  # decided by the loader: tied when output.weight is absent
            bos_token_id=_first_id(meta.get("tokenizer.ggml.bos_token_id")),
            eos_token_id=_first_id(meta.get("tokenizer.ggml.eos_token_id")),
        )


SUPPORTED_ARCHITECTURES = frozenset({"llama", "opt"})


def _first_id(v: Any) -> int | None:
    if isinstance(v, list):
        return int(v[0]) if v else None
    return int(v) if v is not None else None


def _generation_eos_ids(path: Path) -> tuple[int, ...]:
    """``eos_token_id`` (an id or a list) of a Hugging Face ``generation_config.json``; () when absent."""
    if not path.is_file():
        return ()
    try:
        gen = json.loads(path.read_text())
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, nested too deeply
        raise ConfigError(f"cannot parse {path}: {e}") from e
    v = gen.get("eos_token_id") if isinstance(gen, dict) else None
    ids = v if isinstance(v, list) else [] if v is None else [v]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ConfigError(f"{path}: eos_token_id must be a non-negative id or a list of them, got {v!r}")
    return tuple(ids)


def _hf_dtype(v: Any) -> str:
    if v in ("bfloat16", "float16", "float32"):
        return str(v)
    return "float32"


_REQUIRED = object()


def _int_field(cfg: dict[str, Any], key: str, source: str, *, default: Any = _REQUIRED, minimum: int = 1,
               none_is_default: bool = False, name: str | None = None) -> int:
    """``cfg[key]`` as an int >= ``minimum``: a JSON integer, or a float with an integral value (``64.0``);
    ``64.9``, ``"64"`` and booleans are refused. Absent: ``default`` (a required field's absence, or null, is
    an error); null is the default too where ``none_is_default``. Errors name ``source`` and the field."""
    name = name or key
    v = cfg.get(key)
    if v is None and (key not in cfg or none_is_default or default is _REQUIRED):
        if default is _REQUIRED:
            raise ConfigError(f"{source}: missing field {name!r}")
        return default
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(f"{source}: field {name!r} must be an integer, got {v!r}")
    if v < minimum:
        raise ConfigError(f"{source}: field {name!r} must be >= {minimum}, got {v}")
    return v


def _float_field(cfg: dict[str, Any], key: str, source: str, default: float, *, name: str | None = None) -> float:
    """``cfg[key]`` (default when absent) as a finite number > 0; errors name ``source`` and the field."""
    v = cfg.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ConfigError(f"{source}: field {name or key!r} must be a finite number > 0, got {v!r}")
    return float(v)


def _bool_field(cfg: dict[str, Any], key: str, source: str, default: bool) -> bool:
    """``cfg[key]`` as a JSON boolean (absent or null: ``default``); ``"false"`` or ``0`` are refused."""
    v = cfg.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise ConfigError(f"{source}: field {key!r} must be true or false, got {v!r}")
    return v


def _dict_field(cfg: dict[str, Any], key: str, source: str) -> dict[str, Any]:
    """``cfg[key]`` as a JSON object ({} when absent or null)."""
    v = cfg.get(key)
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise ConfigError(f"{source}: field {key!r} must be an object, got {v!r}")
    return v


def _token_ids(cfg: dict[str, Any], key: str, source: str) -> list[int]:
    """``cfg[key]``: a token id or a list of them (``eos_token_id: [128001, 128008]``), each an int >= 0."""
    v = cfg.get(key)
    ids = [] if v is None else v if isinstance(v, list) else [v]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ConfigError(f"{source}: field {key!r} must be a token id >= 0 or a list of them, got {v!r}")
    return ids


def _hf_sliding_window(cfg: dict[str, Any], model_type: str, source: str) -> int | None:
    """The sliding window transformers applies to some layer of this config, None when every layer attends
    fully: Mistral's ``sliding_window``; Qwen2's only with ``use_sliding_window`` (default false) and on the
    layers from ``max_window_layers`` on; ``layer_types`` (transformers 5) decides where it is given.
    Llama has none."""
    if model_type == "llama":
        return None
    window = _int_field(cfg, "sliding_window", source, default=None, none_is_default=True, minimum=2)
    if window is None:
        return None
    if model_type == "qwen2" and not _bool_field(cfg, "use_sliding_window", source, False):
        return None
    layer_types = cfg.get("layer_types")
    if isinstance(layer_types, list):
        return window if "sliding_attention" in layer_types else None
    if model_type == "qwen2":
        layers = _int_field(cfg, "num_hidden_layers", source)
        if _int_field(cfg, "max_window_layers", source, default=28, minimum=0) >= layers:
            return None
    return window


def _gguf_rope_scaling(meta: dict[str, Any], arch: str, source: str) -> RopeScaling | None:
    """GGUF RoPE scaling as llama.cpp reads it: ``{arch}.rope.scaling.type`` (absent: linear) with
    ``{arch}.rope.scaling.factor`` (or the older ``{arch}.rope.scale_linear``); a linear factor of 1 (or 0,
    llama.cpp's "unset") is no scaling. Types other than none/linear (yarn, longrope) are refused, and so is a
    linear type with no factor."""
    type_key, factor_key = f"{arch}.rope.scaling.type", f"{arch}.rope.scaling.factor"
    kind = meta.get(type_key)
    factor, named = meta.get(factor_key), factor_key
    if factor is None and meta.get(f"{arch}.rope.scale_linear") is not None:
        factor, named = meta[f"{arch}.rope.scale_linear"], f"{arch}.rope.scale_linear"
    if kind is None:
        if factor is None or factor in (0, 1):
            return None
        kind = "linear"
    if kind == "none":
        return None
    if kind != "linear":
        raise ConfigError(f"{source}: unsupported GGUF {type_key} {kind!r} (supported: none, linear)")
    if factor is None:
        raise ConfigError(f"{source}: GGUF field {type_key!r} is 'linear' but {factor_key!r} is missing")
    factor = _float_field({named: factor}, named, source, 1.0)
    return RopeScaling("linear", factor=factor)


def _rope_scaling(d: dict[str, Any], source: str, field: str = "rope_scaling") -> RopeScaling | None:
    """The RoPE scaling of a ``rope_scaling`` / ``rope_parameters`` object ``d`` (named ``field`` in errors)."""
    if not d:
        return None
    kind = d.get("rope_type", d.get("type", "default"))
    if kind in (None, "default"):
        return None
    if kind not in ("linear", "llama3"):
        raise ConfigError(
            f"{source}: unsupported {field}.rope_type {kind!r} (supported: default, linear, llama3)"
        )
    for key in ("factor",) + (("low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
                              if kind == "llama3" else ()):
        if d.get(key) is None:
            raise ConfigError(f"{source}: {field} of type {kind} lacks field {key!r}")
    factor = _float_field(d, "factor", source, 1.0, name=f"{field}.factor")
    if kind == "linear":
        return RopeScaling("linear", factor=factor)
    return RopeScaling(
        "llama3",
        factor=factor,
        low_freq_factor=_float_field(d, "low_freq_factor", source, 1.0, name=f"{field}.low_freq_factor"),
        high_freq_factor=_float_field(d, "high_freq_factor", source, 4.0, name=f"{field}.high_freq_factor"),
        original_max_position_embeddings=_int_field(d, "original_max_position_embeddings", source,
                                                    name=f"{field}.original_max_position_embeddings"),
    )


# ------------------------------------------------------------------------------------------------ presets


def _llama(name: str, vocab: int, hidden: int, inter: int, layers: int, heads: int, kv: int, **kw: Any) -> ModelConfig:
    return ModelConfig("llama", vocab, hidden, inter, layers, heads, kv, kw.pop("head_dim", hidden // heads),
                       name=name, **kw)


def _opt(name: str, hidden: int, layers: int, heads: int, **kw: Any) -> ModelConfig:
    return ModelConfig("opt", 50272, hidden, 4 * hidden, layers, heads, heads, hidden // heads, name=name,
                       hidden_act="relu", tie_word_embeddings=True, word_embed_proj_dim=hidden,
                       max_position_embeddings=2048, bos_token_id=2, eos_token_id=2, **kw)


PRESETS: dict[str, ModelConfig] = {
    c.name: c
    for c in [
        _opt("opt-125m", 768, 12, 12),
        _opt("opt-1.3b", 2048, 24, 32),
        _opt("opt-13b", 5120, 40, 40),
        _opt("opt-66b", 9216, 64, 72),
        _opt("opt-175b", 12288, 96, 96),
        _llama("llama-2-7b", 32000, 4096, 11008, 32, 32, 32, max_position_embeddings=4096, bos_token_id=1,
               eos_token_id=2),
        _llama("llama-2-13b", 32000, 5120, 13824, 40, 40, 40, max_position_embeddings=4096, bos_token_id=1,
               eos_token_id=2),
        _llama("llama-3-8b", 128256, 4096, 14336, 32, 32, 8, max_position_embeddings=8192, rope_theta=500000.0,
               bos_token_id=128000, eos_token_id=128001),
        _llama("mistral-7b", 32000, 4096, 14336, 32, 32, 8, max_position_embeddings=32768, sliding_window=4096,
               bos_token_id=1, eos_token_id=2),
        _llama("qwen2-0.5b", 151936, 896, 4864, 24, 14, 2, max_position_embeddings=32768, rope_theta=1e6,
               norm_eps=1e-6, qkv_bias=True, tie_word_embeddings=True, eos_token_id=151643),
        _llama("qwen2-7b", 152064, 3584, 18944, 28, 28, 4, max_position_embeddings=32768, rope_theta=1e6,
               norm_eps=1e-6, qkv_bias=True, eos_token_id=151643),
        _llama("smollm2-135m", 49152, 576, 1536, 30, 9, 3, max_position_embeddings=8192, rope_theta=100000.0,
               tie_word_embeddings=True, bos_token_id=1, eos_token_id=2),
        # Tiny presets for tests and quick experiments.
        _llama("tiny-llama", 256, 64, 128, 2, 4, 2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2),
        ModelConfig("opt", 256, 64, 128, 2, 4, 4, 16, name="tiny-opt", hidden_act="relu",
                    tie_word_embeddings=True, word_embed_proj_dim=64, max_position_embeddings=512,
                    bos_token_id=2, eos_token_id=2),
    ]
}


def get_preset(name: str, dtype: str | None = None) -> ModelConfig:
    """The preset ``name`` (see ``PRESETS``), optionally with another dtype."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; presets: {sorted(PRESETS)}")
    cfg = PRESETS[name]
    return cfg.replace(dtype=dtype) if dtype else cfg
