"""Plain numeric descriptions of a transformer and of an accelerator, enough to size and time an iteration.

``ModelSpec`` holds only the numbers a cost model needs (layer count, widths, head counts, vocabulary); it
does not depend on ``jserve.models`` so the simulator runs without the engine. ``ModelSpec.from_hf_config``
reads a Hugging Face ``config.json``-style dict (OPT and Llama families). ``GPUSpec`` holds the memory size
as ``torch.cuda.get_device_properties(...).total_memory`` reports it (the artifact's servers size their KV
pools from that number), the HBM bandwidth, dense fp16 tensor throughput, and the host link bandwidth.

Every number in the named presets below is a public datasheet or model-card value; each says where it is from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

MiB = 1 << 20
GiB = 1 << 30


@dataclass(frozen=True)
class ModelSpec:
    """A decoder-only transformer's shape. ``mlp`` is ``"gelu"`` (two matrices, OPT) or ``"swiglu"`` (three,
    Llama). ``learned_positions`` adds a ``max_position_embeddings x hidden`` table (OPT)."""

    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int = 2048
    mlp: str = "gelu"
    tied_embeddings: bool = True
    learned_positions: bool = False
    dtype_bytes: int = 2

    def __post_init__(self) -> None:
        for field_name in (
            "num_layers",
            "hidden_size",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "intermediate_size",
            "vocab_size",
            "max_position_embeddings",
            "dtype_bytes",
        ):
            value = getattr(self, field_name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelSpec {self.name!r}: {field_name} must be an int >= 1, got {value!r}")
        if self.mlp not in ("gelu", "swiglu"):
            raise ValueError(f"ModelSpec {self.name!r}: mlp must be 'gelu' or 'swiglu', got {self.mlp!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelSpec {self.name!r}: num_heads ({self.num_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads})"
            )

    # Parameter counts.

    @property
    def attention_params_per_layer(self) -> int:
        q_out = self.num_heads * self.head_dim
        kv_out = self.num_kv_heads * self.head_dim
        return self.hidden_size * q_out + 2 * self.hidden_size * kv_out + q_out * self.hidden_size

    @property
    def mlp_params_per_layer(self) -> int:
        return (3 if self.mlp == "swiglu" else 2) * self.hidden_size * self.intermediate_size

    @property
    def matmul_params(self) -> int:
        """Weights that take part in a matrix multiply per token: every layer's projections and the LM head."""
        per_layer = self.attention_params_per_layer + self.mlp_params_per_layer
        return self.num_layers * per_layer + self.vocab_size * self.hidden_size

    @property
    def num_params(self) -> int:
        """All weights, biases and norms ignored (they are < 0.1% of these models)."""
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tied_embeddings else 2)
        positions = self.max_position_embeddings * self.hidden_size if self.learned_positions else 0
        return self.num_layers * (self.attention_params_per_layer + self.mlp_params_per_layer) + embeddings + positions

    @property
    def weight_bytes(self) -> int:
        return self.num_params * self.dtype_bytes

    # Per-token quantities.

    @property
    def kv_bytes_per_token(self) -> int:
        """Key and value entries of one token across every layer."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes

    def kv_block_bytes(self, block_size: int) -> int:
        return block_size * self.kv_bytes_per_token

    @property
    def matmul_flops_per_token(self) -> int:
        """Multiply-adds of the dense projections for one token, counted as 2 FLOPs each."""
        return 2 * self.matmul_params

    @property
    def attention_flops_per_token_pair(self) -> int:
        """FLOPs per (query, key) pair over all layers: QK^T and PV, 2 FLOPs per multiply-add each.

        A causal prefill of ``n`` tokens touches about ``n**2 / 2`` pairs, so it costs ``coeff * n**2 / 2``."""
        return 4 * self.num_heads * self.head_dim * self.num_layers

    @classmethod
    def from_hf_config(cls, config: Mapping, name: str | None = None, dtype_bytes: int = 2) -> "ModelSpec":
        """Build from a Hugging Face ``config.json`` dict of the OPT or Llama family."""
        if not isinstance(config, Mapping):
            raise ValueError(f"a model config must be a JSON object (dict), got {type(config).__name__}")

        def num(key: str, default: object = None) -> int:
            if key not in config and default is None:
                raise ValueError(f"model config is missing the field {key!r}")
            value = config.get(key, default)
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                raise ValueError(f"model config field {key!r} must be an integer >= 1, got {value!r}")
            try:
                as_int = int(value)
            except ValueError:
                raise ValueError(f"model config field {key!r} must be an integer >= 1, got {value!r}") from None
            if as_int != float(value) or as_int < 1:
                raise ValueError(f"model config field {key!r} must be an integer >= 1, got {value!r}")
            return as_int

        model_type = config.get("model_type", "")
        hidden = num("hidden_size")
        heads = num("num_attention_heads")
        if model_type == "opt":
            return cls(
                name=name or config.get("_name_or_path", "opt"),
                num_layers=num("num_hidden_layers"),
                hidden_size=hidden,
                num_heads=heads,
                num_kv_heads=heads,
                head_dim=hidden // heads,
                intermediate_size=num("ffn_dim"),
                vocab_size=num("vocab_size"),
                max_position_embeddings=num("max_position_embeddings", 2048),
                mlp="gelu",
                tied_embeddings=True,
                learned_positions=True,
                dtype_bytes=dtype_bytes,
            )
        return cls(
            name=name or config.get("_name_or_path", model_type or "llama"),
            num_layers=num("num_hidden_layers"),
            hidden_size=hidden,
            num_heads=heads,
            num_kv_heads=num("num_key_value_heads", heads),
            head_dim=num("head_dim") if config.get("head_dim") else hidden // heads,
            intermediate_size=num("intermediate_size"),
            vocab_size=num("vocab_size"),
            max_position_embeddings=num("max_position_embeddings", 2048),
            mlp="swiglu",
            tied_embeddings=bool(config.get("tie_word_embeddings", False)),
            learned_positions=False,
            dtype_bytes=dtype_bytes,
        )


@dataclass(frozen=True)
class GPUSpec:
    """One accelerator. ``memory_bytes`` is what the CUDA runtime reports as total memory; bandwidths are bytes/s,
    ``peak_flops`` dense fp16/bf16 tensor FLOP/s, ``host_link_bandwidth`` the achievable host<->device copy rate
    one way, ``interconnect_bandwidth`` the per-GPU all-reduce bus bandwidth for tensor parallelism."""

    name: str
    memory_bytes: int
    hbm_bandwidth: float
    peak_flops: float
    host_link_bandwidth: float
    interconnect_bandwidth: float = 300e9
    interconnect_latency: float = 10e-6  # seconds per all-reduce of a small message

    def __post_init__(self) -> None:
        for field_name in ("memory_bytes", "hbm_bandwidth", "peak_flops", "host_link_bandwidth", "interconnect_bandwidth"):
            value = getattr(self, field_name)
            if not value > 0:
                raise ValueError(f"GPUSpec {self.name!r}: {field_name} must be > 0, got {value!r}")
        if not self.interconnect_latency >= 0:
            raise ValueError(f"GPUSpec {self.name!r}: interconnect_latency must be >= 0")


# --- Models (Hugging Face config.json values) --------------------------------------------------------------

# facebook/opt-13b: 40 layers, hidden 5120, 40 heads, ffn 20480, vocab 50272, 2048 positions.
OPT_13B = ModelSpec("opt-13b", 40, 5120, 40, 40, 128, 20480, 50272, 2048, "gelu", True, True)
# facebook/opt-66b: 64 layers, hidden 9216, 72 heads, ffn 36864.
OPT_66B = ModelSpec("opt-66b", 64, 9216, 72, 72, 128, 36864, 50272, 2048, "gelu", True, True)
# facebook/opt-175b (metaseq config): 96 layers, hidden 12288, 96 heads, ffn 49152.
OPT_175B = ModelSpec("opt-175b", 96, 12288, 96, 96, 128, 49152, 50272, 2048, "gelu", True, True)
# meta-llama/Meta-Llama-3-8B: 32 layers, hidden 4096, 32 q heads / 8 kv heads, ffn 14336, vocab 128256.
LLAMA3_8B = ModelSpec("llama-3-8b", 32, 4096, 32, 8, 128, 14336, 128256, 8192, "swiglu", False, False)

MODELS: dict[str, ModelSpec] = {m.name: m for m in (OPT_13B, OPT_66B, OPT_175B, LLAMA3_8B)}

# --- Accelerators (NVIDIA datasheets; memory as the CUDA runtime reports it) ---------------------------------

# A100-SXM4-40GB: 40536 MiB reported, 1555 GB/s HBM2, 312 TFLOP/s fp16 dense; PCIe 4.0 x16 about 25 GB/s in
# practice (DESIGN.md section 6); NVLink 3 600 GB/s bidirectional (300 GB/s each way).
A100_40GB = GPUSpec("a100-40gb", 40536 * MiB, 1555e9, 312e12, 25e9, 300e9)
# A100-SXM4-80GB: 81920 MiB nominal (the runtime reports slightly less), 2039 GB/s HBM2e.
A100_80GB = GPUSpec("a100-80gb", 81920 * MiB, 2039e9, 312e12, 25e9, 300e9)
# H100-SXM5-80GB: 3350 GB/s HBM3, 989 TFLOP/s bf16 dense, PCIe 5.0 about 50 GB/s, NVLink 4 450 GB/s each way.
H100_80GB = GPUSpec("h100-80gb", 81559 * MiB, 3350e9, 989e12, 50e9, 450e9)

GPUS: dict[str, GPUSpec] = {g.name: g for g in (A100_40GB, A100_80GB, H100_80GB)}
