"""Bad input gets a ValueError that names the offending argument; the backend switch resolves as documented."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import kernels_pallas
from kernels_pallas import (
    DecodeConfig,
    PrefillConfig,
    WriteConfig,
    paged_decode_attention,
    ragged_paged_attention,
    resolve_backend,
    write_kv,
)

f32, bf16, i32 = jnp.float32, jnp.bfloat16, jnp.int32


def _z(shape, dtype=f32):
    return jnp.zeros(shape, dtype)


PAGES = _z((2, 5, 8, 64))
GOOD_DECODE = dict(q=_z((3, 4, 64)), k_pages=PAGES, v_pages=PAGES, block_tables=_z((3, 2), i32), lengths=_z((3,), i32))
GOOD_RAGGED = dict(
    q=_z((7, 4, 64)), k_pages=PAGES, v_pages=PAGES, block_tables=_z((2, 2), i32), seq_lens=_z((2,), i32),
    query_start_loc=_z((3,), i32),
)
GOOD_WRITE = dict(k_pages=PAGES, v_pages=PAGES, k=_z((7, 2, 64)), v=_z((7, 2, 64)), slot_mapping=_z((7,), i32))


def _decode(backend="reference", scale=0.1, config=None, **over):
    args = {**GOOD_DECODE, **over}
    return paged_decode_attention(*args.values(), scale=scale, backend=backend, config=config)


def _ragged(backend="reference", **over):
    args = {**GOOD_RAGGED, **over}
    return ragged_paged_attention(*args.values(), scale=0.1, backend=backend)


def _write(backend="reference", **over):
    args = {**GOOD_WRITE, **over}
    return write_kv(*args.values(), backend=backend)


@pytest.mark.parametrize(
    "over,pattern",
    [
        (dict(q=_z((3, 64))), "q must have shape"),
        (dict(q=_z((3, 4, 32))), "q head_dim 32"),
        (dict(q=_z((3, 3, 64))), "q num_q_heads 3"),
        (dict(q=_z((3, 4, 64), bf16)), "q dtype bfloat16"),
        (dict(v_pages=_z((2, 6, 8, 64))), "v_pages shape"),
        (dict(v_pages=_z((2, 5, 8, 64), bf16)), "v_pages dtype"),
        (dict(k_pages=_z((2, 5, 8)), v_pages=_z((2, 5, 8))), "k_pages must have shape"),
        (dict(k_pages=_z((2, 5, 8, 64), i32), v_pages=_z((2, 5, 8, 64), i32)), "k_pages must be a floating"),
        (dict(block_tables=_z((3, 2), jnp.int16)), "block_tables must be int32"),
        (dict(block_tables=_z((4, 2), i32)), "block_tables has 4 rows"),
        (dict(block_tables=_z((3,), i32)), "block_tables must have shape"),
        (dict(lengths=_z((4,), i32)), "lengths has 4 entries"),
        (dict(lengths=_z((3,), f32)), "lengths must be int32"),
        # an empty batch: was a ZeroDivisionError in interpret mode
        (dict(q=_z((0, 4, 64)), block_tables=_z((0, 2), i32), lengths=_z((0,), i32)), "at least one sequence slot"),
    ],
)
def test_decode_argument_errors_name_the_argument(over, pattern):
    with pytest.raises(ValueError, match=pattern):
        _decode(**over)


@pytest.mark.parametrize(
    "over,pattern",
    [
        (dict(seq_lens=_z((2, 1), i32)), "seq_lens must have shape"),
        (dict(seq_lens=_z((3,), i32)), "block_tables has 2 rows"),
        (dict(query_start_loc=_z((2,), i32)), "query_start_loc has 2 entries"),
        (dict(query_start_loc=_z((3,), f32)), "query_start_loc must be int32"),
        (dict(q=_z((7, 4, 64), bf16)), "q dtype"),
        (dict(q=_z((0, 4, 64))), "at least one token slot"),  # each backend failed differently, none clearly
    ],
)
def test_ragged_argument_errors_name_the_argument(over, pattern):
    with pytest.raises(ValueError, match=pattern):
        _ragged(**over)


@pytest.mark.parametrize(
    "over,pattern",
    [
        (dict(k=_z((7, 3, 64))), "k shape"),
        (dict(v=_z((6, 2, 64))), "v shape"),
        (dict(slot_mapping=_z((6,), i32)), "slot_mapping has 6 entries"),
        (dict(slot_mapping=_z((7,), jnp.uint32)), "slot_mapping must be int32"),
        (dict(k=_z((7, 2, 64), i32)), "k must be a floating"),
    ],
)
def test_write_argument_errors_name_the_argument(over, pattern):
    with pytest.raises(ValueError, match=pattern):
        _write(**over)


def test_scale_backend_and_config_errors():
    with pytest.raises(ValueError, match="scale must be a Python float"):
        _decode(scale=jnp.float32(0.1))
    with pytest.raises(ValueError, match="scale must be a positive"):
        _decode(scale=0.0)
    with pytest.raises(ValueError, match="backend must be one of"):
        _decode(backend="triton")
    with pytest.raises(ValueError, match="config for paged_decode_attention must be a DecodeConfig"):
        _decode(backend="interpret", config=PrefillConfig())
    with pytest.raises(ValueError, match="DecodeConfig.block_kv must be a power of two"):
        DecodeConfig(block_kv=100)
    with pytest.raises(ValueError, match="DecodeConfig.num_splits"):
        DecodeConfig(num_splits=0)
    with pytest.raises(ValueError, match="PrefillConfig.block_q"):
        PrefillConfig(block_q=3)
    with pytest.raises(ValueError, match="WriteConfig.num_warps"):
        WriteConfig(num_warps=3)


def test_pallas_block_size_errors():
    odd_dim = _z((2, 5, 8, 80))
    with pytest.raises(ValueError, match="head_dim 80"):
        _decode(backend="interpret", q=_z((3, 4, 80)), k_pages=odd_dim, v_pages=odd_dim)
    odd_page = _z((2, 5, 12, 64))
    with pytest.raises(ValueError, match="page_size 12"):
        _ragged(backend="interpret", k_pages=odd_page, v_pages=odd_page)
    # The reference backend has no tile constraints.
    assert _decode(q=_z((3, 4, 80)), k_pages=odd_dim, v_pages=odd_dim).shape == (3, 4, 80)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the CPU behaviour")
def test_backend_resolution_on_cpu(monkeypatch):
    assert resolve_backend(None) == "reference"
    assert resolve_backend("interpret") == "interpret"
    with pytest.raises(ValueError, match="backend='pallas' lowers for a GPU"):
        _decode(backend="pallas")
    monkeypatch.setattr(kernels_pallas.checks.jax, "default_backend", lambda: "gpu")
    assert resolve_backend(None) == "pallas"
