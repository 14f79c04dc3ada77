"""``ModelRunner``: executes scheduled iterations as fixed-shape, precompiled XLA executables.

Every executable is compiled ahead of time at start-up (``warmup``) for a fixed set of shape buckets and
looked up by bucket while serving; nothing is traced or compiled after warm-up (a lookup of a shape that was
not compiled is a bug and raises). The executables:

* ``decode[S]``: ``S`` sequences with one new token each (``T == S``, the decode kernel);
* ``mixed[T]``: ``T`` packed tokens of up to ``max_batch_size`` sequences (prefill chunks, recompute,
  decodes riding along), ragged attention over the paged context;
* ``gather[n]`` / ``scatter[n]``: the device-local halves of host-offload copies of ``n`` pages (``n`` a
  swap bucket). The transfers between memory kinds are plain ``jax.device_put`` calls, asynchronous, so
  copies issued alongside a step run while it computes (see ``jserve.engine.kv_cache`` for the copy path
  and its ordering rules).

Block tables always have ``ceil(max_model_len / page_size)`` columns, padded with the reserved padding
page. The device pool is donated to every step and every scatter; so are the penalty tables
(``jserve.engine.penalties``: per-request token counts, kept on the device beside the pool) to every step.
A step returns the sampled token ids (``[max_batch_size]`` int32, the batch's rows first) and their
log-probabilities (``StepOutputs``; read by the host only when a row asked).

Tokens not yet on the host. A row's last input token may be one that the previous step is still sampling
(async scheduling): the step takes that step's ``tokens`` array as ``prev_tokens`` and, per row, the index of
the token to take from it (``feed``; ``max_batch_size`` = none), and puts it in place on the device before
anything reads ``ids``. So the host never waits for step n's tokens before it dispatches step n+1, and the
device runs the steps back to back.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kernels_pallas import AttentionMetadata

from .config import check_step_buckets
from .kv_cache import KVCache, bucket_pairs, gather_pages, scatter_pages
from .penalties import (PenaltyArrays, PenaltyRow, SlotRebuild, init_tables, rebuild_slots, record_tokens,
                        sample_processed)
from .sampling import SamplingArrays, sample_tokens, token_logprobs

__all__ = ["RunnerConfig", "BatchRow", "ModelRunner", "PreparedStep", "StepOutputs", "powers_of_two"]


def powers_of_two(low: int, high: int) -> tuple[int, ...]:
    """``low, 2*low, 4*low, ...`` while below ``high``, then ``high`` itself: buckets covering ``[1, high]``."""
    out = []
    b = max(1, low)
    while b < high:
        out.append(b)
        b *= 2
    out.append(high)
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class RunnerConfig:
    """Shapes the runner compiles. Empty bucket tuples get defaults from the limits; ``resolved`` checks them
    against the limits (``check_step_buckets``, which ``EngineConfig`` runs before the model loads)."""

    page_size: int
    max_batch_size: int
    max_tokens_per_batch: int
    max_model_len: int
    decode_buckets: tuple[int, ...] = ()  # sequence counts of decode-only steps
    token_buckets: tuple[int, ...] = ()  # packed token counts of steps with prefill work
    # Pages per copy chunk (gather/scatter executables). Default 1, 4, 16, 64 and a request's pages (at most
    # 256): every request splits into chunks without padding slots (which would be moved and kept for nothing)
    # with ten executables to compile.
    swap_buckets: tuple[int, ...] = ()
    penalty_slots: int = 0  # rows of the penalty tables (penalties.PenaltySlots); 0: max_batch_size
    # skip sampling work no row needs with run-time branches (sampling.py's module docstring); None: on a CPU
    # only (on a GPU each branch makes the dispatching thread wait for the device)
    skip_idle_work: bool | None = None
    # steps also return their hidden states, and prompt_logprobs[P] executables are compiled (SamplingParams.
    # prompt_logprobs; see ModelRunner.prompt_logprobs)
    prompt_logprobs: bool = False

    def resolved(self) -> "RunnerConfig":
        decode = self.decode_buckets or powers_of_two(1, self.max_batch_size)
        tokens = self.token_buckets or powers_of_two(min(64, self.max_tokens_per_batch), self.max_tokens_per_batch)
        top = min(256, self.pages_per_seq)
        swap = self.swap_buckets or tuple(b for b in (1, 4, 16, 64) if b < top) + (top,)
        if min(swap) < 1:
            raise ValueError(f"swap_buckets {swap} must be page counts >= 1")
        cfg = dataclasses.replace(self, decode_buckets=tuple(sorted(decode)), token_buckets=tuple(sorted(tokens)),
                                  swap_buckets=tuple(sorted(set(swap))),
                                  penalty_slots=self.penalty_slots or self.max_batch_size)
        check_step_buckets(cfg.decode_buckets, cfg.token_buckets, cfg.max_batch_size, cfg.max_tokens_per_batch)
        return cfg

    @property
    def pages_per_seq(self) -> int:
        return -(-self.max_model_len // self.page_size)

    @property
    def max_step_tokens(self) -> int:
        """The most packed tokens of any step (rows of the hidden states a step returns)."""
        return max(max(self.decode_buckets), max(self.token_buckets))

    @property
    def rebuild_buckets(self) -> tuple[int, ...]:
        """Entries (token ids) per penalty-slot rebuild executable: 512, 4096, 32768, up to the first that
        holds a full batch of full-length requests; a larger rebuild runs in several calls of the largest."""
        out = [512]
        while out[-1] < min(self.max_batch_size * self.max_model_len, 32768):
            out.append(out[-1] * 8)
        return tuple(out)

    @property
    def prompt_logprob_buckets(self) -> tuple[int, ...]:
        """Position counts of the prompt_logprobs executables: 64, 128, ... up to the first >= every step's
        tokens (powers of two, so those above the 256-row chunk are multiples of it)."""
        out = [64]
        while out[-1] < self.max_step_tokens:
            out.append(out[-1] * 2)
        return tuple(out)


@dataclasses.dataclass(frozen=True)
class BatchRow:
    """One sequence's share of a step: compute ``tokens`` at positions ``start ..``; pages cover them."""

    tokens: Sequence[int]
    start: int
    pages: Sequence[int]
    sampling: tuple  # (SamplingParams, seed, generated-so-far)
    penalty: PenaltyRow | None = None  # the request's penalty slot (None: no penalties)
    # () or (ids [k] int32, values [k] float32) added to the row's logits: logit_bias, and -inf for the ids
    # it must not sample (min_tokens)
    adjust: tuple = ()


class StepOutputs(NamedTuple):
    """What a compiled step returns besides the pool (device arrays; rows past the batch are padding).
    The host reads the log-probability arrays only when some row asked (with run-time branches they are then
    zeros; see ``RunnerConfig.skip_idle_work``)."""

    tokens: jax.Array  # [max_batch_size] int32, the sampled token of every row (rows past the batch: padding)
    logprob: jax.Array  # [S] float32, log-probability of the sampled token (unfiltered, temperature 1)
    top_ids: jax.Array  # [S, K] int32, the K = min(20, vocab) most likely ids, most likely first
    top_logprobs: jax.Array  # [S, K] float32, their log-probabilities
    # [max_step_tokens, hidden]: the last layer's output at every packed token (rows past the step's: 0), for
    # prompt log-probabilities; None unless RunnerConfig.prompt_logprobs
    hidden: jax.Array | None = None


class TracedFunctions(NamedTuple):
    """The jitted (not yet compiled) functions of one model on one device; executables are lowered from them."""

    step: Callable  # (state leaves, ids, pos, pool, tables, metadata, *sampling, penalties, prev_tokens, feed)
    #                 -> (StepOutputs, pool, tables)
    gather: Callable  # (pool, src) -> staged
    scatter: Callable  # (pool, staged, dst) -> pool
    prompt_logprobs: Callable  # (state leaves, hidden, rows, targets) -> (chosen, top ids, top logprobs, ranks)
    rebuild: Callable  # (tables, clear, token_slot, tokens, counted) -> tables (penalties.rebuild_slots)


PROMPT_LOGPROB_CHUNK = 256  # positions whose [rows, vocab] logits prompt_logprobs holds at once


def traced_functions(model, device, skip_idle: bool, hidden_rows: int = 0) -> TracedFunctions:
    """The runner's jitted functions for ``model`` on ``device``, built once and kept on the model object.
    ``skip_idle``: see ``RunnerConfig.skip_idle_work``; ``hidden_rows``: steps return their hidden states
    padded to this many rows (0: not at all)."""
    cache = model.__dict__.setdefault("_runner_jits", {})
    if (device, skip_idle, hidden_rows) in cache:
        return cache[device, skip_idle, hidden_rows]
    graphdef = model.graphdef
    state_tree = jax.tree.structure(model.state)

    def step(state_leaves, ids, pos, pool, tables, md, temp, top_k, top_p, seed, counter, want_logprobs, pen,
             prev_tokens, feed):
        # prev_tokens [B] int32: an earlier step's tokens; feed [S] int32: per row, the index into prev_tokens
        # of the row's last input token, or B (the host knew it)
        b = prev_tokens.shape[0]
        fed = feed < b
        last = jnp.where(fed, md.logits_indices, ids.shape[0])  # out of range: dropped
        ids = ids.at[last].set(jnp.take(prev_tokens, jnp.minimum(feed, b - 1)), mode="drop")
        module = nnx.merge(graphdef, jax.tree.unflatten(state_tree, state_leaves))
        h, pool = module.hidden_states(ids, pos, pool, md)
        logits = module.logits(h[md.logits_indices])
        tables, tokens = sample_processed(
            tables, logits, ids, pen, lambda x: sample_tokens(x, temp, top_k, top_p, seed, counter, skip_idle), skip_idle)
        tables = record_tokens(tables, tokens, pen, skip_idle)
        # log-probabilities of the unpenalized distribution (vLLM's default)
        logprobs = token_logprobs(logits, tokens, want_logprobs, skip_idle)
        tokens = jnp.zeros((b,), jnp.int32).at[: tokens.shape[0]].set(tokens)  # one shape for every bucket
        hidden = None
        if hidden_rows:
            hidden = jnp.zeros((hidden_rows, h.shape[1]), h.dtype).at[: h.shape[0]].set(h)
        return StepOutputs(tokens, *logprobs, hidden), pool, tables

    def prompt_logprobs(state_leaves, hidden, rows, targets):
        # hidden [R, H] (a step's); rows [P] int32: packed positions; targets [P] int32: the prompt token
        # after each -> [P] float32, [P, K] int32, [P, K] float32, [P] int32 (token_logprobs of the rows'
        # logits, with the targets' ranks)
        module = nnx.merge(graphdef, jax.tree.unflatten(state_tree, state_leaves))

        def chunk(args):
            r, t = args
            return token_logprobs(module.logits(hidden[r]), t, jnp.ones(r.shape, bool), skip_idle=False,
                                  with_rank=True)

        p = rows.shape[0]
        if p <= PROMPT_LOGPROB_CHUNK:
            return chunk((rows, targets))
        n = p // PROMPT_LOGPROB_CHUNK  # the buckets above the chunk are multiples of it
        out = jax.lax.map(chunk, (rows.reshape(n, -1), targets.reshape(n, -1)))
        return tuple(x.reshape((p,) + x.shape[2:]) for x in out)

    fns = cache[device, skip_idle, hidden_rows] = TracedFunctions(
        step=jax.jit(step, donate_argnums=(3, 4)),
        gather=jax.jit(gather_pages),
        scatter=jax.jit(scatter_pages, donate_argnums=(0,)),
        prompt_logprobs=jax.jit(prompt_logprobs),
        rebuild=jax.jit(rebuild_slots, donate_argnums=(0,)),
    )
    return fns


class ModelRunner:
    """Compiled steps and copies for one model and one KV cache."""

    def __init__(self, model, kv: KVCache, config: RunnerConfig):
        self.model = model
        self.kv = kv
        self.config = config.resolved()
        self.width = self.config.pages_per_seq
        self.num_penalty_slots = self.config.penalty_slots
        # (counts [N, V] int32, seen [N, V] bool): donated to every step like the pool
        self.penalty_tables = init_tables(self.num_penalty_slots, model.config.vocab_size, kv.device_sharding)
        # Compiled executables depend only on the model and on shapes, so engines over the same model with the
        # same pool sizes and buckets share them (kept on the model object).
        shared = model.__dict__.setdefault("_runner_executables", {})
        skip = self.config.skip_idle_work
        self.skip_idle_work = skip if skip is not None else kv.device_id.platform == "cpu"
        self.hidden_rows = self.config.max_step_tokens if self.config.prompt_logprobs else 0
        signature = (kv.num_device_pages, kv.spec, self.width, self.config.max_batch_size, self.num_penalty_slots,
                     str(kv.device_id), self.skip_idle_work, self.hidden_rows)
        self._executables: dict[tuple, Callable] = shared.setdefault(signature, {})
        self.warmed_up = False
        self.compile_seconds = 0.0
        # The parameters travel as a flat list of arrays: dispatching a compiled executable flattens its
        # arguments in Python, and an nnx.State of a 30-layer model costs ~0.3 ms per call that way (a list of
        # the same leaves ~0.05 ms).
        self._state_leaves = jax.tree.leaves(model.state)
        self.fns = traced_functions(model, kv.device_id, self.skip_idle_work, self.hidden_rows)
        # prev_tokens of a step that takes no token from an earlier one
        self._no_tokens = jax.device_put(np.zeros(self.config.max_batch_size, np.int32), kv.device_sharding)

    # ------------------------------------------------------------------------------------------ compile

    def executable_keys(self) -> list[tuple]:
        c = self.config
        keys = [("decode", s) for s in c.decode_buckets] + [("mixed", t) for t in c.token_buckets]
        keys += [("rebuild", m) for m in c.rebuild_buckets]
        if c.prompt_logprobs:
            keys += [("prompt_logprobs", p) for p in c.prompt_logprob_buckets]
        if self.kv.num_host_pages > 0:
            keys += [(op, n) for n in c.swap_buckets for op in ("gather", "scatter")]
        return keys

    def warmup(self, progress: bool = True) -> float:
        """Compile every executable; returns the seconds it took."""
        keys = self.executable_keys()
        t0 = time.perf_counter()
        it = keys
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(keys, desc="jserve: compiling step buckets", unit="exe", leave=False)
        for key in it:
            if key not in self._executables:
                self._executables[key] = self._compile(key)
        if self.kv.num_host_pages > 0:
            self._warm_transfers()
        self.compile_seconds = time.perf_counter() - t0
        self.warmed_up = True
        return self.compile_seconds

    def _warm_transfers(self) -> None:
        """One round trip per swap bucket through the padding page, so that whatever the runtime sets up on a
        first transfer between memory kinds (pinned host allocations) happens before serving."""
        kv = self.kv
        for n in self.config.swap_buckets:
            pad = np.full(n, kv.pad_device_page, np.int32)
            staged = self._executables[("gather", n)](kv.device, pad)
            back = jax.device_put(jax.device_put(staged, kv.host_sharding), kv.device_sharding)
            kv.device = self._executables[("scatter", n)](kv.device, back, pad)
        jax.block_until_ready(kv.device)

    def _compile(self, key: tuple) -> Callable:
        kv = self.kv
        if key[0] in ("gather", "scatter"):
            idx = np.zeros(key[1], np.int32)
            if key[0] == "gather":
                return self.fns.gather.lower(kv.device, idx).compile()
            staged = jax.eval_shape(self.fns.gather, kv.device, idx)
            return self.fns.scatter.lower(kv.device, staged, idx).compile()
        if key[0] == "rebuild":
            idx = np.zeros(key[1], np.int32)
            clear = np.zeros(self.config.max_batch_size, np.int32)
            return self.fns.rebuild.lower(self.penalty_tables, clear, idx, idx, idx).compile()
        if key[0] == "prompt_logprobs":
            idx = np.zeros(key[1], np.int32)
            hidden = jax.ShapeDtypeStruct((self.hidden_rows, self.model.config.hidden_size),
                                          jnp.dtype(self.model.config.dtype))
            return self.fns.prompt_logprobs.lower(self._state_leaves, hidden, idx, idx).compile()
        kind, size = key
        s = size if kind == "decode" else self.config.max_batch_size
        ids, pos, md, samp, pen = self._pack([], size, s, kind == "decode")  # an all-padding step of the shape
        return self.fns.step.lower(self._state_leaves, ids, pos, kv.device, self.penalty_tables, md, *samp,
                                   pen, self._no_tokens, self._no_feed(s)).compile()

    def _no_feed(self, s: int) -> np.ndarray:
        return np.full(s, self.config.max_batch_size, np.int32)

    def _get(self, key: tuple) -> Callable:
        exe = self._executables.get(key)
        if exe is None:
            if self.warmed_up:
                raise RuntimeError(f"jserve runner: no compiled executable for {key}; buckets are "
                                   f"{self.config} (this is a bug: shapes must come from the buckets)")
            exe = self._executables[key] = self._compile(key)
        return exe

    # ------------------------------------------------------------------------------------------ packing

    def _pack(self, rows: Sequence[BatchRow], t: int, s: int, decode_only: bool):
        """Padded step inputs for ``rows``: per-row Python work is list building only; the arithmetic is
        vectorized over the packed tokens (this runs on the host every iteration)."""
        ps = self.config.page_size
        pad = self.kv.pad_device_page
        r_count = len(rows)
        ids = np.zeros(t, np.int32)
        pos = np.zeros(t, np.int32)
        slots = np.full(t, -1, np.int32)
        tables = np.full((s, self.width), pad, np.int32)
        seq_lens = np.zeros(s, np.int32)
        qsl = np.zeros(s + 1, np.int32)
        logits_idx = np.zeros(s, np.int32)
        lens = np.zeros(0, np.int32)
        if r_count:
            lens = np.fromiter((len(r.tokens) for r in rows), np.int32, r_count)
            starts = np.fromiter((r.start for r in rows), np.int32, r_count)
            for i, r in enumerate(rows):
                tables[i, : len(r.pages)] = r.pages
            total = int(lens.sum())
            ends = np.cumsum(lens)
            ids[:total] = np.fromiter(itertools.chain.from_iterable(r.tokens for r in rows), np.int32, total)
            row_of_t = np.repeat(np.arange(r_count), lens)
            p = starts[row_of_t] + np.arange(total, dtype=np.int32) - (ends - lens)[row_of_t]
            pos[:total] = p
            slots[:total] = tables[row_of_t, p // ps] * ps + p % ps
            seq_lens[:r_count] = starts + lens
            qsl[1 : r_count + 1] = ends
            qsl[r_count + 1 :] = total
            logits_idx[:r_count] = ends - 1
        md = AttentionMetadata(slot_mapping=slots, block_tables=tables, seq_lens=seq_lens, query_start_loc=qsl,
                               logits_indices=logits_idx, decode_only=decode_only)
        samp = SamplingArrays.build([r.sampling for r in rows], s).step_inputs()
        pen = PenaltyArrays.build([(r.penalty, r.sampling[0], r.adjust) for r in rows], lens, t, s,
                                  self.num_penalty_slots, self.model.config.vocab_size)
        return ids, pos, md, samp, pen

    def step_key(self, rows: Sequence[BatchRow]) -> tuple[str, int]:
        """The compiled shape a batch runs in: ("decode", S) or ("mixed", T)."""
        c = self.config
        if all(len(r.tokens) == 1 for r in rows):
            n = len(rows)
            return "decode", next(b for b in c.decode_buckets if b >= n)
        total = sum(len(r.tokens) for r in rows)
        for b in c.token_buckets:
            if b >= total:
                return "mixed", b
        raise ValueError(f"a step of {total} tokens exceeds the largest token bucket {c.token_buckets[-1]}")

    # ------------------------------------------------------------------------------------------ running

    def copy(self, direction: str, pairs: Sequence[tuple[int, int]], runs: Sequence[int] | None = None) -> None:
        """Copies issued now, before anything dispatched later (``direction`` = "out": device->host pairs,
        "in": host->device pairs). The transfers are asynchronous; the device pool is rebound at once.
        ``runs`` (swap-outs): the lengths of the consecutive runs of ``pairs`` that are one request's each
        (default: all one run); no host buffer holds pages of two runs."""
        if direction == "out":
            self._swap_out(pairs, runs)
        elif direction == "in":
            self._scatter_in(self._transfer_in(pairs))
        else:
            raise ValueError(f"copy direction must be 'out' or 'in', got {direction!r}")

    def _swap_out(self, pairs: Sequence[tuple[int, int]], runs: Sequence[int] | None = None) -> None:
        """Gather ``(device, host)`` pairs into chunks on the device and start their transfers to the host. Each
        of ``runs`` (one request's pairs) is chunked on its own, so that a host buffer holds one request's
        pages and is released whole when that request comes back or ends (``KVCache`` docstring)."""
        if not pairs:
            return
        kv = self.kv
        chunks = []
        start = 0
        for n in runs if runs is not None else (len(pairs),):
            chunks += bucket_pairs(pairs[start:start + n], self.config.swap_buckets, kv.pad_device_page,
                                   kv.pad_host_page)
            start += n
        if start != len(pairs):
            raise ValueError(f"swap-out runs {list(runs)} do not add up to the {len(pairs)} pairs")
        staged = [self._get(("gather", b))(kv.device, src) for b, src, _ in chunks]
        for array, (_, _, dst) in zip(jax.device_put(staged, kv.host_sharding), chunks):
            kv.store(array, dst)

    def _transfer_in(self, pairs: Sequence[tuple[int, int]]) -> list[tuple[jax.Array, np.ndarray]]:
        """Start the transfers of the host buffers holding ``(host, device)`` pairs' sources to the device;
        returns ``[(staged buffer, device page of every slot [n]), ...]`` for ``_scatter_in``."""
        if not pairs:
            return []
        kv = self.kv
        groups = kv.locate([h for h, _ in pairs])
        staged = jax.device_put([buf.array for buf, _ in groups], kv.device_sharding)
        loads = []
        for array, (buf, items) in zip(staged, groups):
            dst = np.full(buf.num_slots, kv.pad_device_page, np.int32)  # slots not asked for: the padding page
            for slot, i in items:
                dst[slot] = pairs[i][1]
            loads.append((array, dst))
        return loads

    def _scatter_in(self, loads: Sequence[tuple[jax.Array, np.ndarray]]) -> None:
        kv = self.kv
        for staged, dst in loads:
            kv.device = self._get(("scatter", len(dst)))(kv.device, staged, dst)

    def prepare(self, rows: Sequence[BatchRow]) -> "PreparedStep":
        """Pack ``rows`` into the inputs of their compiled shape (host work only; nothing is dispatched).

        A row may end with a placeholder token whose value is not known yet (the token the step in flight is
        sampling): :meth:`PreparedStep.feed_last_token` names where :meth:`launch`'s ``prev_tokens`` hold it."""
        c = self.config
        kind, size = self.step_key(rows)
        s = size if kind == "decode" else c.max_batch_size
        if len(rows) > s:
            raise ValueError(f"{len(rows)} sequences exceed the step's {s} sequence slots")
        ids, pos, md, samp, pen = self._pack(rows, size, s, kind == "decode")
        return PreparedStep(kind, size, len(rows), ids, pos, md, samp, pen, self._no_feed(s))

    def launch(
        self,
        step: "PreparedStep",
        swap_out: Sequence[tuple[int, int]] = (),
        swap_in: Sequence[tuple[int, int]] = (),
        prev_tokens: jax.Array | None = None,
        swap_out_runs: Sequence[int] | None = None,
    ) -> StepOutputs:
        """Dispatch a prepared step with its overlapped copies; returns its outputs as device arrays
        (``[slots, ...]``; the first ``step.num_rows`` rows are the batch's). Nothing waits for the device here.
        ``prev_tokens``: an earlier step's ``StepOutputs.tokens``, read by the rows ``step.feed`` names.
        ``swap_out_runs``: as ``copy``'s ``runs``.

        The swap-outs are gathered and their transfers started before the step, the swap-ins' transfers are
        started before it and scattered after it, so both transfers run while the step computes (the pages
        they move are not the batch's: the scheduler guarantees it)."""
        kv = self.kv
        self._swap_out(swap_out, swap_out_runs)
        loads = self._transfer_in(swap_in)
        outputs, kv.device, self.penalty_tables = self._get((step.kind, step.size))(
            self._state_leaves, step.ids, step.pos, kv.device, self.penalty_tables, step.metadata, *step.sampling,
            step.penalties, self._no_tokens if prev_tokens is None else prev_tokens, step.feed)
        self._scatter_in(loads)
        return outputs

    def rebuild_penalty_slots(self, owners: Sequence[tuple[int, Sequence[int], Sequence[int]]]) -> None:
        """Dispatch the rebuild of penalty slots from token ids, ``owners``: (slot, prompt ids, generated ids)
        per slot (at most ``max_batch_size``): each slot is zeroed, then marks its ids as seen and counts its
        generated ids. Ordered before the next step by the tables' data flow; nothing waits for the device."""
        total = sum(len(p) + len(g) for _, p, g in owners)
        buckets = self.config.rebuild_buckets
        m = next((b for b in buckets if b >= total), buckets[-1])
        for call in SlotRebuild.build(owners, self.config.max_batch_size, m, self.num_penalty_slots):
            self.penalty_tables = self._get(("rebuild", m))(self.penalty_tables, *call)

    def prompt_logprobs(self, hidden: jax.Array, rows: Sequence[int], targets: Sequence[int]):
        """Dispatch the log-probabilities of ``targets[i]`` after packed position ``rows[i]`` of the step whose
        ``StepOutputs.hidden`` is ``hidden`` (prompt log-probabilities: the raw model's, temperature 1), with
        the top ``K`` ids and the target's rank in the vocabulary; returns device arrays ``([P], [P, K], [P, K],
        [P])``, the first ``len(rows)`` rows the asked ones. Nothing waits for the device here."""
        p = next(b for b in self.config.prompt_logprob_buckets if b >= len(rows))
        r = np.zeros(p, np.int32)
        t = np.zeros(p, np.int32)
        r[: len(rows)] = rows
        t[: len(rows)] = targets
        return self._get(("prompt_logprobs", p))(self._state_leaves, hidden, r, t)

    def run(
        self,
        rows: Sequence[BatchRow],
        swap_out: Sequence[tuple[int, int]] = (),
        swap_in: Sequence[tuple[int, int]] = (),
    ) -> np.ndarray:
        """One step over ``rows`` with overlapped copies, waited for; returns the sampled token of every row
        (``[len(rows)]``)."""
        return np.asarray(self.launch(self.prepare(rows), swap_out, swap_in).tokens)[: len(rows)]


@dataclasses.dataclass
class PreparedStep:
    """A packed step, ready to dispatch: its compiled shape and host-side input arrays."""

    kind: str  # "decode" | "mixed"
    size: int  # the bucket: sequences (decode) or packed tokens (mixed)
    num_rows: int
    ids: np.ndarray  # [T] int32
    pos: np.ndarray  # [T] int32
    metadata: AttentionMetadata
    sampling: tuple
    penalties: PenaltyArrays
    feed: np.ndarray  # [S] int32: per row, where launch's prev_tokens hold its last token (max_batch_size: none)

    def feed_last_token(self, row: int, index: int) -> None:
        """The last token of ``row`` (a placeholder at packing time) is ``prev_tokens[index]`` at launch."""
        self.feed[row] = index
