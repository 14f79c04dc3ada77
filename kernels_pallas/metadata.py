"""``AttentionMetadata``: how one fixed-shape iteration's packed tokens map onto sequences and KV pages.

Shapes are padded buckets chosen by the executor: ``T`` packed tokens, ``S`` sequence slots, ``M`` pages
per sequence. Padding tokens (index >= ``query_start_loc[-1]``) have ``slot_mapping == -1``: their K/V are
written nowhere and their attention output is zero. Padded sequence slots have ``seq_len == 0`` and an empty
query range (``query_start_loc[s] == query_start_loc[s + 1]``).

Conventions shared by every kernel and reference in this package:

* The step's new K/V are written into the pages *before* attention runs (``write_kv``), so a sequence's
  context ``seq_lens[s]`` counts its cached tokens plus this step's new ones.
* Query token ``j`` of sequence ``s`` (there are ``q_len = query_start_loc[s+1] - query_start_loc[s]``)
  sits at position ``seq_lens[s] - q_len + j`` and attends causally to keys ``0 .. that position``.
* A slot is ``page * page_size + offset_in_page``.
"""

from __future__ import annotations

import dataclasses

import jax


@dataclasses.dataclass(frozen=True)
class AttentionMetadata:
    slot_mapping: jax.Array  # [T] int32, destination slot of each packed token's K/V; -1 for padding
    block_tables: jax.Array  # [S, M] int32, physical page ids of each sequence, in logical order
    seq_lens: jax.Array  # [S] int32, context length of each sequence including this step's tokens
    query_start_loc: jax.Array  # [S + 1] int32, cumulative query offsets into the packed tokens
    logits_indices: jax.Array  # [S] int32, packed index of the token whose logits are sampled per sequence
    # Static: True when every sequence has exactly one query token and T == S (selects the decode kernel).
    decode_only: bool = False

    @property
    def num_tokens(self) -> int:
        return self.slot_mapping.shape[0]

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]


jax.tree_util.register_dataclass(
    AttentionMetadata,
    data_fields=["slot_mapping", "block_tables", "seq_lens", "query_start_loc", "logits_indices"],
    meta_fields=["decode_only"],
)
