"""Logit processing inside the compiled step: repetition, frequency and presence penalties (the
device-resident per-request tables, the per-step inputs that address them, the host bookkeeping of which
request holds which slot) and the per-row sparse logit adjustments (``logit_bias`` and the ``min_tokens``
mask).

Semantics (vLLM's), per row, on the raw logits before temperature / top-k / top-p / greedy argmax:

* ``repetition_penalty`` r: every id in the prompt or the output so far: ``logit / r`` if ``logit > 0``,
  else ``logit * r`` (transformers' ``RepetitionPenaltyLogitsProcessor``);
* ``frequency_penalty`` f: ``logit -= f * count(id in the output so far)``;
* ``presence_penalty`` p: ``logit -= p * (count(id in the output so far) > 0)``.

The results are clamped to float32's finite range: an extreme r overflows ``logit / r`` (or ``logit * r``),
and an infinite logit would turn the sampler's ``logits - max`` into NaN.

State. The runner keeps two tables on the device beside the KV pool, donated to every step and updated in
place: ``counts [N, V] int32`` (times each id was generated) and ``seen [N, V] bool`` (ids fed to the model:
the prompt and every generated token, since each generated token is the input of the request's next step).
``N`` slots (``EngineConfig.max_penalty_requests``, at least ``max_batch_size``) hold the state of requests
with any penalty. Since the host can rebuild a slot from a request's token ids (``seen``: its prompt and
generated ids; ``counts``: its generated ids), a slot is a cache and only the rows of the step being
dispatched need one: a request keeps its slot after its step until a request of a later step needs one and
none is free (``PenaltySlots``: least recently dispatched first, never one of that step). A request
dispatched without a slot gets one that the step itself zeroes when nothing of the request was computed or
generated yet (its first dispatch: the step's tokens mark it), or that ``rebuild_slots`` (bucketed by the
number of ids, dispatched before the step) rebuilds otherwise. So every penalty request is queued to the
scheduler at once, like any other, whatever ``N``. A step takes, per row, the slot whose tables penalize
its logits, the slot to zero first and the slot whose ``counts`` take its sampled token (rows that really
sample); per packed token, the slot whose ``seen`` it marks. "No slot" is ``N`` (out of range: gathers
fill, scatters drop). With ``skip_idle`` (the default on a CPU; see ``sampling``'s module docstring) all of
it (and the sampler after it) runs under ``lax.cond``, skipped at run time when no row or token names a
slot or an adjusted id, so batches without penalties, ``logit_bias`` or ``min_tokens`` pay four predicates;
without it, it runs for every batch and leaves rows without a slot or an adjustment as they are.

Because the tables are threaded through the steps (and rebuilds) on the device, async scheduling (a row
whose newest token is still being sampled by the step in flight) sees that token's update in dispatch order,
with no host round trip; a request with a token in flight ran in that step and still holds its slot, and a
slot taken from a request whose step is in flight is rebuilt after that step records into it. A recompute
after preemption re-marks ``seen`` (idempotent) and only the one new token it samples adds to ``counts``;
swaps leave the slot alone.

Adjustments: before the penalties (vLLM's V1 sampler applies its logit-bias and min-tokens processors
first), each row adds up to ``MAX_ADJUSTMENTS`` sparse values to its raw logits, ``adjust_ids [S, K]`` /
``adjust_values [S, K]`` (the adjusted ids are computed apart and set into the penalized row; unused entries
name id ``V``, out of range, and are dropped). A row that samples carries its request's ``logit_bias`` (at most
``MAX_LOGIT_BIAS`` entries, every step) and, while the request has generated fewer than ``min_tokens``, its
end-of-sequence and stop ids (at most ``MAX_BANNED_IDS``) with value ``-inf``. A row names each id once: an
id both biased and banned keeps only its ``-inf`` and stays masked (the final clamp to float32's finite
range leaves it at the lowest finite value, never drawn).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Callable, Hashable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .sampling import MAX_LOGIT_BIAS, when_needed

__all__ = ["PenaltyRow", "PenaltyArrays", "PenaltySlots", "SlotRebuild", "init_tables", "table_bytes",
           "apply_penalties", "sample_processed", "record_tokens", "rebuild_slots", "request_adjustments",
           "MAX_BANNED_IDS", "MAX_ADJUSTMENTS"]

MAX_BANNED_IDS = 32  # ids a row may mask for min_tokens (its end-of-sequence ids and stop_token_ids)
MAX_ADJUSTMENTS = MAX_BANNED_IDS + MAX_LOGIT_BIAS  # K: sparse logit adjustments per row (332)

Tables = tuple  # (counts [N, V] int32, seen [N, V] bool)


@dataclasses.dataclass(frozen=True)
class PenaltyRow:
    """A step row's penalty slot and what the step does with it."""

    slot: int
    reset: bool  # zero the slot before anything else (the request's first dispatch)
    samples: bool  # the row's sampled token is the request's next token: count it


class PenaltyArrays(NamedTuple):
    """The step's penalty inputs (numpy, host side); ``N`` (the slot count) means "no slot"."""

    slot: np.ndarray  # [S] int32, the slot whose tables penalize the row's logits
    reset: np.ndarray  # [S] int32, the slot to zero before the step
    record: np.ndarray  # [S] int32, the slot whose counts take the row's sampled token
    token_slot: np.ndarray  # [T] int32, the slot whose ``seen`` each packed token marks
    repetition: np.ndarray  # [S] float32, 1 = off
    frequency: np.ndarray  # [S] float32, 0 = off
    presence: np.ndarray  # [S] float32, 0 = off
    adjust_ids: np.ndarray  # [S, MAX_ADJUSTMENTS] int32, distinct ids whose logits get a value added; >= V: unused
    adjust_values: np.ndarray  # [S, MAX_ADJUSTMENTS] float32, the values (logit_bias; -inf: min_tokens mask)

    @classmethod
    def build(cls, rows: Sequence[tuple[PenaltyRow | None, object, tuple]], lens: np.ndarray, t: int, s: int,
              num_slots: int, vocab: int) -> "PenaltyArrays":
        """``rows``: (penalty row or None, SamplingParams, adjustments) per batch row, the adjustments ``()`` or
        ``(ids [k], values [k])`` to add to the row's logits (numpy arrays, built once per request: 64
        (id, value) tuples cost 4 us per row and step); ``lens`` ``[len(rows)]``: the row's packed token count
        (rows are packed in order from token 0)."""
        adjust_ids = np.full((s, MAX_ADJUSTMENTS), vocab, np.int32)
        adjust_values = np.zeros((s, MAX_ADJUSTMENTS), np.float32)
        for i, (_, _, adj) in enumerate(rows):
            if adj:
                k = len(adj[0])
                if k > MAX_ADJUSTMENTS:
                    raise ValueError(f"{k} logit adjustments in one row; at most {MAX_ADJUSTMENTS}")
                adjust_ids[i, :k] = adj[0]
                adjust_values[i, :k] = adj[1]
        none = np.int32(num_slots)
        slot, reset, record = (np.full(s, none, np.int32) for _ in range(3))
        token_slot = np.full(t, none, np.int32)
        rep = np.ones(s, np.float32)
        freq = np.zeros(s, np.float32)
        pres = np.zeros(s, np.float32)
        if any(pr is not None for pr, _, _ in rows):
            for i, (pr, p, _) in enumerate(rows):
                if pr is None:
                    continue
                slot[i] = pr.slot
                reset[i] = pr.slot if pr.reset else none
                record[i] = pr.slot if pr.samples else none
                rep[i], freq[i], pres[i] = p.repetition_penalty, p.frequency_penalty, p.presence_penalty
            total = int(lens.sum())
            token_slot[:total] = np.repeat(slot[: len(rows)], lens)
        return cls(slot, reset, record, token_slot, rep, freq, pres, adjust_ids, adjust_values)


def request_adjustments(params, eos: frozenset[int], vocab: int) -> tuple[tuple, tuple]:
    """A request's row adjustments while it has generated fewer than ``min_tokens`` tokens and after, each
    ``()`` or ``(ids [k] int32, values [k] float32)``: its ``logit_bias``, then ``-inf`` for ``eos`` and its
    stop ids in the first (when ``min_tokens``; a biased id that is also masked keeps only its mask, so each
    id appears once). A bias id outside ``[0, vocab)`` or more than
    ``MAX_BANNED_IDS`` masked ids raise ``ValueError`` naming the field."""
    bias = params.logit_bias or ()
    if bias and bias[-1][0] >= vocab:  # sorted by id
        raise ValueError(f"SamplingParams.logit_bias names id {bias[-1][0]}, outside the model's vocabulary "
                         f"[0, {vocab})")
    banned = sorted(eos | set(params.stop_token_ids)) if params.min_tokens else []
    if len(banned) > MAX_BANNED_IDS:
        raise ValueError(f"SamplingParams.min_tokens masks the end-of-sequence and stop ids, at most "
                         f"{MAX_BANNED_IDS}; this request has {len(banned)}")

    def arrays(pairs):
        return (np.array([t for t, _ in pairs], np.int32), np.array([v for _, v in pairs], np.float32)) if pairs else ()

    # a masked id stays masked whatever its bias (-inf + bias): its bias entry is dropped, so a row's ids are
    # distinct, which ``apply_penalties`` relies on
    masked = set(banned)
    return arrays([(t, v) for t, v in bias if t not in masked] + [(t, -np.inf) for t in banned]), arrays(bias)


def table_bytes(num_slots: int, vocab: int) -> int:
    """Device bytes of the two tables: ``N * V * 5``."""
    return num_slots * vocab * (4 + 1)


def init_tables(num_slots: int, vocab: int, device) -> Tables:
    """Zeroed ``(counts [N, V] int32, seen [N, V] bool)`` on ``device``."""
    counts = jax.device_put(np.zeros((num_slots, vocab), np.int32), device)
    seen = jax.device_put(np.zeros((num_slots, vocab), np.bool_), device)
    return counts, seen


def apply_penalties(
    tables: Tables,  # (counts [N, V] int32, seen [N, V] bool)
    logits: jax.Array,  # [S, V] float32, raw
    ids: jax.Array,  # [T] int32, the step's packed input tokens
    pen: PenaltyArrays,
) -> tuple[Tables, jax.Array]:  # updated tables, [S, V] float32 processed logits
    """Zero the reset slots, mark the packed tokens in ``seen``, add the rows' sparse adjustments to the raw
    logits, then penalize each row from its slot (traceable; unconditional: ``sample_processed`` skips it
    when idle)."""
    counts, seen = tables
    counts = counts.at[pen.reset].set(0, mode="drop")
    seen = seen.at[pen.reset].set(False, mode="drop")
    seen = seen.at[pen.token_slot, ids].set(True, mode="drop")
    c = jnp.take(counts, pen.slot, axis=0, mode="fill", fill_value=0)  # [S, V]
    s = jnp.take(seen, pen.slot, axis=0, mode="fill", fill_value=False)  # [S, V]
    r, f, p = pen.repetition[:, None], pen.frequency[:, None], pen.presence[:, None]

    def penalize(v, seen_v, count_v):  # [S, ...] values with their ids' seen flags and counts
        v = jnp.where(seen_v, jnp.where(v > 0, v / r, v * r), v)
        return v - f * count_v.astype(v.dtype) - p * (count_v > 0).astype(v.dtype)

    # an extreme r overflows logit / r or logit * r; an infinite logit would make the sampler's
    # ``logits - max`` NaN, so the processed logits stay finite (ties at the top are then sampled evenly; a
    # masked id ends at the lowest finite value, which is never drawn)
    top = jnp.finfo(logits.dtype).max
    x = jnp.clip(penalize(logits, s, c), -top, top)
    # The adjustments come before the penalties (vLLM's V1 sampler runs its logit-bias and min-tokens
    # processors first). A scatter into ``logits`` would copy them (they stay live for the log-probabilities),
    # so the adjusted ids are recomputed apart, [S, K], and set into the penalized ``x``. A row names each id
    # at most once (``request_adjustments``), so no two entries of a row write one logit.
    adj_ids = pen.adjust_ids  # [S, K], V = unused
    safe = jnp.minimum(adj_ids, logits.shape[-1] - 1)
    slot = jnp.minimum(pen.slot, counts.shape[0] - 1)[:, None]  # [S, 1]; rows without a slot: masked below
    has_slot = (pen.slot < counts.shape[0])[:, None]
    # read from the tables, not from ``s`` / ``c``, so those stay fused into the whole-row arithmetic
    y = penalize(jnp.take_along_axis(logits, safe, axis=1) + pen.adjust_values, seen[slot, safe] & has_slot,
                 jnp.where(has_slot, counts[slot, safe], 0))
    rows = jnp.arange(logits.shape[0])[:, None]
    return (counts, seen), x.at[rows, adj_ids].set(jnp.clip(y, -top, top), mode="drop")


def sample_processed(
    tables: Tables,  # (counts [N, V] int32, seen [N, V] bool)
    logits: jax.Array,  # [S, V] float32, raw (left unchanged: the log-probabilities read it afterwards)
    ids: jax.Array,  # [T] int32, the step's packed input tokens
    pen: PenaltyArrays,
    sample: Callable[[jax.Array], jax.Array],  # [S, V] logits -> [S] int32 tokens
    skip_idle: bool = True,
) -> tuple[Tables, jax.Array]:  # updated tables, [S] int32 tokens
    """``sample(logits)`` after ``apply_penalties`` when some row or token names a slot or an adjusted id,
    else on the raw logits (with ``skip_idle`` a ``lax.cond``: batches without penalties or adjustments pay
    four predicates; without it always after ``apply_penalties``, which leaves rows without either as they
    are; see ``sampling``'s module docstring).
    The sampler sits inside both branches so that neither returns an ``[S, V]`` array: an untouched
    ``logits`` passed through a branch would be copied, since it stays live for the log-probabilities."""
    n, vocab = tables[0].shape
    active = (jnp.any(pen.slot < n) | jnp.any(pen.reset < n) | jnp.any(pen.token_slot < n)
              | jnp.any(pen.adjust_ids < vocab))

    def on(tables):
        tables, x = apply_penalties(tables, logits, ids, pen)
        return tables, sample(x)

    return when_needed(active, on, lambda tables: (tables, sample(logits)), tables, skip_idle)


def record_tokens(
    tables: Tables,  # (counts [N, V] int32, seen [N, V] bool)
    tokens: jax.Array,  # [S] int32, the sampled tokens
    pen: PenaltyArrays,
    skip_idle: bool = True,
) -> Tables:
    """``counts[record[i], tokens[i]] += 1`` for the rows that sample into a slot (traceable; rows without a
    slot name one past the table and are dropped). ``seen`` needs no update here: a generated token is the
    input of the request's next step, which marks it."""
    counts, seen = tables
    n = counts.shape[0]

    def on(c):
        return c.at[pen.record, tokens].add(1, mode="drop")

    return when_needed(jnp.any(pen.record < n), on, lambda c: c, counts, skip_idle), seen


class PenaltySlots:
    """Host bookkeeping: which request holds which slot, least recently dispatched first.

    A slot is a cache of state the host can rebuild from a request's token ids, so only the rows of the step
    being dispatched need one: ``acquire`` hands out a free slot, else takes the least recently used one from
    a request outside that step (which then rebuilds when it is dispatched again). With at least as many
    slots as a step has rows, a slot is always found."""

    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        self._free = list(range(num_slots - 1, -1, -1))  # pop() hands out slot 0 first
        self._held: collections.OrderedDict[Hashable, int] = collections.OrderedDict()  # LRU first

    def slot_of(self, owner: Hashable) -> int | None:
        """``owner``'s slot, marked as the most recently used (None if it holds none)."""
        slot = self._held.get(owner)
        if slot is not None:
            self._held.move_to_end(owner)
        return slot

    def acquire(self, owner: Hashable, busy: "set | frozenset") -> tuple[int, Hashable | None]:
        """A slot for ``owner`` (which holds none): a free one, else the least recently used one held by a
        request not in ``busy`` (the owners of the step being dispatched). Returns the slot and the request
        it was taken from (None for a free one); raises RuntimeError if every slot is busy."""
        taken = None
        if self._free:
            slot = self._free.pop()
        else:
            taken = next((o for o in self._held if o not in busy), None)
            if taken is None:
                raise RuntimeError(f"all {self.num_slots} penalty slots belong to requests of this step")
            slot = self._held.pop(taken)
        self._held[owner] = slot
        return slot, taken

    def row(self, owner: Hashable, busy: "set | frozenset", *, fresh: bool, samples: bool,
            in_flight: bool) -> tuple[PenaltyRow, bool]:
        """``owner``'s row for the step being dispatched (``busy``: its requests) and whether its slot must be
        rebuilt from its token ids first. A request holding a slot keeps it; one without gets one
        (``acquire``), which the step zeroes when ``fresh`` (nothing of the request computed or generated yet:
        the step's tokens mark it) and which is rebuilt otherwise. A request with a token ``in_flight`` ran in
        that step and kept its slot since; RuntimeError if it has none."""
        slot = self.slot_of(owner)
        if slot is not None:
            return PenaltyRow(slot, False, samples), False
        if in_flight:
            raise RuntimeError(f"request {owner!r}: no penalty slot while its token is in flight")
        slot, _ = self.acquire(owner, busy)
        return PenaltyRow(slot, fresh, samples), not fresh

    def release(self, owner: Hashable) -> None:
        """Give back ``owner``'s slot, if it holds one."""
        slot = self._held.pop(owner, None)
        if slot is not None:
            self._free.append(slot)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def clear(self) -> None:
        self.__init__(self.num_slots)


class SlotRebuild(NamedTuple):
    """Inputs of ``rebuild_slots`` (numpy, host side): slots to zero, then ids to mark per slot. ``N`` (the
    slot count) means "none" (dropped)."""

    clear: np.ndarray  # [B] int32, slots to zero first
    token_slot: np.ndarray  # [M] int32, the slot each entry marks
    tokens: np.ndarray  # [M] int32, ids to mark as seen
    counted: np.ndarray  # [M] int32, 1 for a generated id (also counted), 0 for a prompt id

    @classmethod
    def build(cls, owners: Sequence[tuple[int, Sequence[int], Sequence[int]]], b: int, m: int,
              num_slots: int) -> list["SlotRebuild"]:
        """``owners``: (slot, prompt ids, generated ids) per slot to rebuild (at most ``b``); the entries go in
        calls of ``m`` (the first call zeroes the slots)."""
        if len(owners) > b:
            raise ValueError(f"{len(owners)} penalty slots to rebuild in one step; at most {b}")
        none = np.int32(num_slots)
        clear = np.full(b, none, np.int32)
        clear[: len(owners)] = [slot for slot, _, _ in owners]
        slots = np.concatenate([np.full(len(p) + len(g), slot, np.int32) for slot, p, g in owners])
        tokens = np.concatenate([np.asarray(list(p) + list(g), np.int32) for _, p, g in owners])
        counted = np.concatenate([np.r_[np.zeros(len(p), np.int32), np.ones(len(g), np.int32)]
                                  for _, p, g in owners])

        def part(a: np.ndarray, start: int, fill) -> np.ndarray:  # entries start .. start+m-1, padded
            a = a[start : start + m]
            return np.r_[a, np.full(m - len(a), fill, np.int32)]

        return [cls(clear if start == 0 else np.full(b, none, np.int32), part(slots, start, none),
                    part(tokens, start, 0), part(counted, start, 0))
                for start in range(0, max(len(tokens), 1), m)]


def rebuild_slots(
    tables: Tables,  # (counts [N, V] int32, seen [N, V] bool)
    clear: jax.Array,  # [B] int32
    token_slot: jax.Array,  # [M] int32
    tokens: jax.Array,  # [M] int32
    counted: jax.Array,  # [M] int32
) -> Tables:
    """Zero the ``clear`` slots, then mark each entry's id as seen in its slot and add ``counted`` to its
    count: a slot's state rebuilt from its request's token ids (traceable; "none" entries are dropped)."""
    counts, seen = tables
    counts = counts.at[clear].set(0, mode="drop")
    seen = seen.at[clear].set(False, mode="drop")
    seen = seen.at[token_slot, tokens].set(True, mode="drop")
    counts = counts.at[token_slot, tokens].add(counted, mode="drop")
    return counts, seen
