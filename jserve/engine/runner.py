"""``ModelRunner``: executes scheduled iterations as fixed-shape, precompiled XLA executables.

Every executable is compiled ahead of time at start-up (``warmup``) for a fixed set of shape buckets and
looked up by bucket while serving; nothing is traced or compiled after warm-up (a lookup of a shape that was
not compiled is a bug and raises). The executables:

* ``decode[S]``: ``S`` sequences with one new token each (``T == S``, the decode kernel);
* ``mixed[T]``: ``T`` packed tokens of up to ``max_batch_size`` sequences (prefill chunks, recompute,
  decodes riding along), ragged attention over the paged context;
* each of the above also with overlapped copies, ``+copies[C]``: up to ``C`` swap-out and ``C`` swap-in
  pages moved inside the same executable (see ``jserve.engine.kv_cache`` for the ordering rules);
* ``swap_out[n]`` / ``swap_in[n]``: standalone copies (critical-path swaps, and overlapped copies beyond
  the step's copy bucket).

Block tables always have ``ceil(max_model_len / page_size)`` columns, padded with the reserved padding
page. The device pool is donated to every step; sampled token ids (``[S]`` int32) are the only output the
host reads.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import time
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kernels_pallas import AttentionMetadata

from .kv_cache import (KVCache, bucket_pairs, gather_pages, gather_to_host, load_from_host, scatter_from_host,
                       scatter_pages, store_on_host)
from .sampling import SamplingArrays, sample_tokens

__all__ = ["RunnerConfig", "BatchRow", "ModelRunner", "powers_of_two"]


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
    """Shapes the runner compiles. Empty bucket tuples get defaults from the limits."""

    page_size: int
    max_batch_size: int
    max_tokens_per_batch: int
    max_model_len: int
    decode_buckets: tuple[int, ...] = ()  # sequence counts of decode-only steps
    token_buckets: tuple[int, ...] = ()  # packed token counts of steps with prefill work
    # Overlapped-copy capacity per direction inside a step (0: none). None: (0, 32) on an accelerator, (0,) on
    # a CPU, where nothing overlaps anyway (copies there run as standalone executables before the step).
    copy_buckets: tuple[int, ...] | None = None
    swap_buckets: tuple[int, ...] = ()  # block counts of standalone copy executables (default 4, 16, 64, ...)

    def resolved(self) -> "RunnerConfig":
        decode = self.decode_buckets or powers_of_two(1, self.max_batch_size)
        tokens = self.token_buckets or powers_of_two(min(64, self.max_tokens_per_batch), self.max_tokens_per_batch)
        swap = self.swap_buckets
        if not swap:
            top = max(4, min(256, self.pages_per_seq))
            swap = tuple(b for b in (4, 16, 64, 256) if b < top) + (top,)
        copies = self.copy_buckets
        if copies is None:
            copies = (0,) if jax.default_backend() == "cpu" else (0, 32)
        copies = tuple(sorted(set(copies) | {0}))
        cfg = dataclasses.replace(self, decode_buckets=tuple(sorted(decode)), token_buckets=tuple(sorted(tokens)),
                                  swap_buckets=tuple(sorted(swap)), copy_buckets=copies)
        if max(cfg.decode_buckets) < cfg.max_batch_size:
            raise ValueError(f"decode_buckets {cfg.decode_buckets} do not cover max_batch_size={cfg.max_batch_size}")
        if max(cfg.token_buckets) < cfg.max_tokens_per_batch:
            raise ValueError(
                f"token_buckets {cfg.token_buckets} do not cover max_tokens_per_batch={cfg.max_tokens_per_batch}"
            )
        return cfg

    @property
    def pages_per_seq(self) -> int:
        return -(-self.max_model_len // self.page_size)


@dataclasses.dataclass(frozen=True)
class BatchRow:
    """One sequence's share of a step: compute ``tokens`` at positions ``start ..``; pages cover them."""

    tokens: Sequence[int]
    start: int
    pages: Sequence[int]
    sampling: tuple  # (SamplingParams, seed, generated-so-far)


class TracedFunctions(NamedTuple):
    """The jitted (not yet compiled) functions of one model on one device; executables are lowered from them."""

    step: Callable  # (state leaves, ids, pos, pool, metadata, *sampling) -> (tokens, pool)
    step_copies: Callable  # step + the transfers of overlapped copies -> (tokens, pool, host, staged_in)
    swap_out: Callable  # (pool, host, src, dst) -> host
    swap_in: Callable  # (pool, host, src, dst) -> pool
    gather: Callable  # (pool, src) -> staged
    scatter: Callable  # (pool, staged, dst) -> pool


def traced_functions(model, device) -> TracedFunctions:
    """The runner's jitted functions for ``model`` on ``device``, built once and kept on the model object."""
    cache = model.__dict__.setdefault("_runner_jits", {})
    if device in cache:
        return cache[device]
    graphdef = model.graphdef
    state_tree = jax.tree.structure(model.state)

    def step(state_leaves, ids, pos, pool, md, temp, top_k, top_p, seed, counter):
        module = nnx.merge(graphdef, jax.tree.unflatten(state_tree, state_leaves))
        logits, pool = module(ids, pos, pool, md)
        return sample_tokens(logits, temp, top_k, top_p, seed, counter), pool

    def step_copies(state_leaves, ids, pos, pool, host, md, temp, top_k, top_p, seed, counter,
                    staged_out, out_dst, in_src):
        # Transfers only: the device-local gather/scatter run as their own executables (see kv_cache).
        host = store_on_host(host, staged_out, out_dst, device=device)
        staged_in = load_from_host(host, in_src, device=device)
        tokens, pool = step(state_leaves, ids, pos, pool, md, temp, top_k, top_p, seed, counter)
        return tokens, pool, host, staged_in

    fns = cache[device] = TracedFunctions(
        step=jax.jit(step, donate_argnums=(3,)),
        step_copies=jax.jit(step_copies, donate_argnums=(3, 4)),
        swap_out=jax.jit(functools.partial(gather_to_host, device=device), donate_argnums=(1,)),
        swap_in=jax.jit(functools.partial(scatter_from_host, device=device), donate_argnums=(0,)),
        gather=jax.jit(gather_pages),
        scatter=jax.jit(scatter_pages, donate_argnums=(0,)),
    )
    return fns


class ModelRunner:
    """Compiled steps and copies for one model and one KV cache."""

    def __init__(self, model, kv: KVCache, config: RunnerConfig):
        self.model = model
        self.kv = kv
        self.config = config.resolved()
        self.width = self.config.pages_per_seq
        # Compiled executables depend only on the model and on shapes, so engines over the same model with the
        # same pool sizes and buckets share them (kept on the model object).
        shared = model.__dict__.setdefault("_runner_executables", {})
        signature = (kv.num_device_pages, kv.num_host_pages, kv.spec, self.width, self.config.max_batch_size, str(kv.device_id))
        self._executables: dict[tuple, Callable] = shared.setdefault(signature, {})
        self.warmed_up = False
        self.compile_seconds = 0.0
        # The parameters travel as a flat list of arrays: dispatching a compiled executable flattens its
        # arguments in Python, and an nnx.State of a 30-layer model costs ~0.3 ms per call that way (a list of
        # the same leaves ~0.05 ms).
        self._state_leaves = jax.tree.leaves(model.state)
        self.fns = traced_functions(model, kv.device_id)

    # ------------------------------------------------------------------------------------------ compile

    def executable_keys(self) -> list[tuple]:
        c = self.config
        keys = []
        for copies in c.copy_buckets:
            keys += [("decode", s, copies) for s in c.decode_buckets]
            keys += [("mixed", t, copies) for t in c.token_buckets]
        if self.kv.num_host_pages > 0:
            keys += [("swap_out", n) for n in c.swap_buckets] + [("swap_in", n) for n in c.swap_buckets]
            keys += [(op, n) for n in c.copy_buckets if n for op in ("gather", "scatter")]
        else:
            keys = [k for k in keys if k[0] in ("decode", "mixed") and k[2] == 0]
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
        self.compile_seconds = time.perf_counter() - t0
        self.warmed_up = True
        return self.compile_seconds

    def _compile(self, key: tuple) -> Callable:
        kv = self.kv
        if key[0] in ("gather", "scatter"):
            idx = np.zeros(key[1], np.int32)
            if key[0] == "gather":
                return self.fns.gather.lower(kv.device, idx).compile()
            staged = jax.eval_shape(self.fns.gather, kv.device, idx)
            return self.fns.scatter.lower(kv.device, staged, idx).compile()
        if key[0] in ("swap_out", "swap_in"):
            n = key[1]
            idx = np.zeros(n, np.int32)
            fn = self.fns.swap_out if key[0] == "swap_out" else self.fns.swap_in
            return fn.lower(kv.device, kv.host, idx, idx).compile()
        kind, size, copies = key
        s = size if kind == "decode" else self.config.max_batch_size
        ids, pos, md, samp = self._pack([], size, s, kind == "decode")  # an all-padding step of the shape
        if copies:
            idx = np.zeros(copies, np.int32)
            staged = jax.eval_shape(self.fns.gather, kv.device, idx)
            return self.fns.step_copies.lower(
                self._state_leaves, ids, pos, kv.device, kv.host, md, *samp, staged, idx, idx
            ).compile()
        return self.fns.step.lower(self._state_leaves, ids, pos, kv.device, md, *samp).compile()

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
        samp = SamplingArrays.build([r.sampling for r in rows], s).as_tuple()
        return ids, pos, md, samp

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

    def copy(self, direction: str, pairs: Sequence[tuple[int, int]]) -> None:
        """Standalone copies (``direction`` = "out": device->host pairs, "in": host->device pairs)."""
        if not pairs:
            return
        kv = self.kv
        if direction == "out":
            for b, src, dst in bucket_pairs(pairs, self.config.swap_buckets, kv.pad_device_page, kv.pad_host_page):
                kv.host = self._get(("swap_out", b))(kv.device, kv.host, src, dst)
        else:
            for b, src, dst in bucket_pairs(pairs, self.config.swap_buckets, kv.pad_host_page, kv.pad_device_page):
                kv.device = self._get(("swap_in", b))(kv.device, kv.host, src, dst)

    def run(
        self,
        rows: Sequence[BatchRow],
        swap_out: Sequence[tuple[int, int]] = (),
        swap_in: Sequence[tuple[int, int]] = (),
    ) -> np.ndarray:
        """One step over ``rows`` with overlapped copies; returns the sampled token of every row ([len(rows)])."""
        c = self.config
        kv = self.kv
        kind, size = self.step_key(rows)
        s = size if kind == "decode" else c.max_batch_size
        if len(rows) > s:
            raise ValueError(f"{len(rows)} sequences exceed the step's {s} sequence slots")
        need = max(len(swap_out), len(swap_in))
        copies = 0
        if need and kv.num_host_pages > 0:
            fits = [b for b in c.copy_buckets if b >= need]
            copies = fits[0] if fits else max(c.copy_buckets)
        # Overlapped copies that do not fit the step's copy bucket run before the step (see kv_cache).
        if copies < len(swap_out):
            self.copy("out", swap_out[copies:])
        if copies < len(swap_in):
            self.copy("in", swap_in[copies:])
        ids, pos, md, samp = self._pack(rows, size, s, kind == "decode")
        if copies:
            out_src = np.full(copies, kv.pad_device_page, np.int32)
            out_dst = np.full(copies, kv.pad_host_page, np.int32)
            in_src = np.full(copies, kv.pad_host_page, np.int32)
            in_dst = np.full(copies, kv.pad_device_page, np.int32)
            for j, (a, b) in enumerate(swap_out[:copies]):
                out_src[j], out_dst[j] = a, b
            for j, (a, b) in enumerate(swap_in[:copies]):
                in_src[j], in_dst[j] = a, b
            staged_out = self._get(("gather", copies))(kv.device, out_src)
            exe = self._get((kind, size, copies))
            tokens, kv.device, kv.host, staged_in = exe(self._state_leaves, ids, pos, kv.device, kv.host, md, *samp,
                                                        staged_out, out_dst, in_src)
            kv.device = self._get(("scatter", copies))(kv.device, staged_in, in_dst)
        else:
            exe = self._get((kind, size, 0))
            tokens, kv.device = exe(self._state_leaves, ids, pos, kv.device, md, *samp)
        return np.asarray(tokens)[: len(rows)]
