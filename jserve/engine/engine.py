"""``LLMEngine``: the iteration loop that drives a ``schedulers`` policy on a real model.

An iteration:

1. ``plan = scheduler.schedule(now)`` (batch membership, chunk sizes, swaps, drops: the policy decides);
2. the plan's critical-path copies (``sync_swap_out`` then ``sync_swap_in``), dispatched before the step;
3. one compiled step over the batch (prefill chunks, recompute and decodes packed together) with sampling
   on the device, and the plan's overlapped copies issued beside it (asynchronous transfers that run while
   it computes; ``jserve.engine.kv_cache`` has the ordering rules); host pages the scheduler no longer needs
   are released;
4. the sampled tokens are appended and stop conditions checked (end-of-sequence unless ``ignore_eos``, stop
   ids, stop strings, ``min_tokens``: ``jserve.engine.stopping``); ``scheduler.on_step_end(plan, now, elapsed, finished_ids)`` closes the iteration
   (the scheduler itself finishes requests at ``max_tokens`` or the model's context).

**Async scheduling** (``EngineConfig.async_scheduling``; on by default for accelerators). The host work of an
iteration (scheduling, packing the inputs, reading and checking tokens) would leave the device idle if done
between steps. With async scheduling one ``step()`` call closes iteration n in the scheduler, plans and packs
iteration n+1 while iteration n still runs on the device, dispatches iteration n+1 (rows whose newest token
iteration n is still sampling take it from n's output array on the device: ``ModelRunner.launch``'s
``prev_tokens``), and only then waits for iteration n's tokens and processes them while n+1 runs, so the
device has the next step queued before it finishes the current one. What the scheduler cannot know when it plans n+1 is which requests iteration n stopped (a stop
id, end-of-sequence, a stop string: lengths it knows). A stopped request therefore may run one more iteration;
the engine drops the token computed past the stop (the output is already finished) and reports the request
as finished in that iteration's ``on_step_end`` (or aborts it in the scheduler if that plan did not include
it). Outputs, seeds (a request's n-th draw uses ``fold_in(seed, n)``) and preemption are as in the
one-iteration-at-a-time loop (``async_scheduling=False``); tokens reach callers one ``step()`` call later.
Device order is what makes reuse safe: an iteration that reuses the pages of a request released while an
earlier iteration was still running is dispatched after it, and the executables run in dispatch order on
the donated pool.

The engine never changes policy state: it feeds each scheduled request the tokens it asks for (the
request's known tokens from ``num_computed_tokens`` on), so recompute after a drop replays the prompt and the
generated tokens, and swaps only move pages. Every policy in ``schedulers`` runs unchanged.

Clock: seconds since the engine was created (``time.perf_counter``). Threading: not thread-safe; one thread
owns an engine (``jserve.engine.async_engine`` runs it on a background thread for servers).
"""

from __future__ import annotations

import itertools
import numbers
import os
import random
import time
from typing import Hashable, Sequence

import jax
import numpy as np

from schedulers import SchedulerConfig, make_scheduler
from schedulers.request import KVLocation, Request

from .config import EngineConfig, device_pages, host_pages, resolve_max_model_len
from .kv_cache import KVCache, KVCacheSpec
from .metrics import EngineMetrics
from .outputs import RequestMetrics, RequestOutput
from .penalties import PenaltySlots, request_adjustments, table_bytes
from .prefix import next_page_key, prefix_page_keys
from .records import InFlight, SequenceState, fill_prompt_logprobs, logprob_dict
from .runner import BatchRow, ModelRunner, RunnerConfig
from .sampling import SamplingParams
from .compile_watch import CompileWatch
from .stopping import check_stop, detokenize

__all__ = ["EngineConfig", "LLMEngine", "CompileWatch"]


def check_request_id(request_id: Hashable) -> Hashable:
    """``request_id`` if it can key the engine's tables, else a ``ValueError`` naming its type."""
    try:
        hash(request_id)
    except TypeError:
        raise ValueError(f"request_id must be hashable (a str or an int), got {type(request_id).__name__}") from None
    return request_id


def request_runs(pairs: Sequence[tuple[int, int]], swapped_out: Sequence) -> list[int] | None:
    """The lengths of the consecutive runs of swap-out ``pairs`` that move one request each (the scheduler
    lists a request's pairs together; ``swapped_out`` holds the requests, their blocks now the host ids), so
    the runner never puts two requests' pages in one host buffer. None when there are no pairs."""
    if not pairs:
        return None
    owner = {h: k for k, r in enumerate(swapped_out) for h in r.blocks}
    runs: list[int] = []
    last = object()
    for _, h in pairs:
        k = owner.get(h)
        if runs and k == last:
            runs[-1] += 1
        else:
            runs.append(1)
            last = k
    return runs


class LLMEngine:
    """Scheduler-driven serving engine for one model on one device."""

    def __init__(self, model, config: EngineConfig | None = None):
        self.model = model
        self.config = cfg = config or EngineConfig()
        mc = model.config
        self.tokenizer = model.tokenizer
        self.max_model_len = resolve_max_model_len(cfg.max_model_len, mc)
        spec = KVCacheSpec(mc.num_layers, mc.num_kv_heads, mc.head_dim, cfg.page_size, mc.dtype)
        self.device = jax.devices()[0]
        num_penalty = cfg.max_penalty_requests or cfg.max_batch_size
        num_device = device_pages(cfg, spec, self.max_model_len, self.device,
                                  reserved_bytes=table_bytes(num_penalty, mc.vocab_size),
                                  reserved_by=f"max_penalty_requests={num_penalty} (penalty tables of "
                                              f"{num_penalty} x vocab {mc.vocab_size} x 5 bytes)")
        num_host = host_pages(cfg, spec)
        self.kv = KVCache(spec, num_device, num_host, self.device)
        self.runner = ModelRunner(
            model,
            self.kv,
            RunnerConfig(
                page_size=cfg.page_size,
                max_batch_size=cfg.max_batch_size,
                max_tokens_per_batch=cfg.max_tokens_per_batch,
                max_model_len=self.max_model_len,
                decode_buckets=cfg.decode_buckets,
                token_buckets=cfg.token_buckets,
                swap_buckets=cfg.swap_buckets,
                penalty_slots=num_penalty,
                skip_idle_work=cfg.skip_idle_work,
                prompt_logprobs=cfg.enable_prompt_logprobs,
            ),
        )
        self._penalty_slots = PenaltySlots(num_penalty)
        base = cfg.scheduler_config or SchedulerConfig()
        sched_cfg = base.replace(
            block_size=cfg.page_size,
            max_batch_size=cfg.max_batch_size,
            max_tokens_per_batch=cfg.max_tokens_per_batch,
            max_model_len=self.max_model_len,
            num_device_blocks=num_device,
            num_host_blocks=num_host,
            reserved_device_ids=(self.kv.pad_device_page,),
        )
        self.scheduler = make_scheduler(cfg.scheduler, sched_cfg, cfg.cost_model)
        self._seqs: dict[Hashable, SequenceState] = {}
        # every end-of-sequence id of the model config (config.json's list, generation_config.json) and the
        # tokenizer's: chat models end turns with their own token (Llama-3 Instruct: config 128001
        # <|end_of_text|>, also 128008 <|eom_id|> and 128009 <|eot_id|>, the tokenizer's eos)
        tok_eos = self.tokenizer.eos_token_id if self.tokenizer is not None else None
        self._eos_ids = mc.eos_token_ids | ({tok_eos} if tok_eos is not None else set())
        self.async_scheduling = (cfg.async_scheduling if cfg.async_scheduling is not None
                                 else self.device.platform != "cpu")
        self._in_flight: InFlight | None = None  # the dispatched iteration whose tokens are not read yet
        self._stopped: list[Hashable] = []  # requests that hit a stop condition, not yet finished by the scheduler
        self.metrics = EngineMetrics()  # counters, gauges and latency histograms (the server's /metrics)
        self._batch_ids: list[Hashable] = []  # the requests of the last dispatched step (the running gauge)
        self._ids = itertools.count()
        self._rng = random.Random(int.from_bytes(os.urandom(8), "little"))
        self._t0 = time.perf_counter()
        self.stats = {"steps": 0, "compute_steps": 0, "tokens": 0, "blocks_out": 0, "blocks_in": 0, "drops": 0,
                      "penalty_rebuilds": 0, "compiles_after_warmup": 0, "prefix_cache_queries": 0,
                      "prefix_cache_hits": 0}
        self.compile_seconds = self.runner.warmup(progress=cfg.progress)
        self._watch = CompileWatch().__enter__()  # counts any compilation from here on
        self._t0 = time.perf_counter()  # the engine clock starts when it can serve

    # ----------------------------------------------------------------------------------------- requests

    def now(self) -> float:
        return time.perf_counter() - self._t0

    def _tokenize(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer; pass the prompt as a list of token ids")
            ids = self.tokenizer.encode(prompt, add_special_tokens=True)  # BOS where the model's tokenizer asks
            vocab = self.model.config.vocab_size
            bad = next((t for t in ids if not 0 <= t < vocab), None)
            if bad is not None:  # a tokenizer with more tokens than the model's embedding: not silently clipped
                raise ValueError(f"the tokenizer gave token id {bad}, outside the model's vocabulary [0, {vocab})")
            return prompt, ids
        if isinstance(prompt, (list, tuple, np.ndarray)):
            ids = []
            vocab = self.model.config.vocab_size
            for t in prompt:
                if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
                    raise ValueError(f"prompt token ids must be ints, got {t!r}")
                if not 0 <= int(t) < vocab:
                    raise ValueError(f"prompt token id {int(t)} is outside the vocabulary [0, {vocab})")
                ids.append(int(t))
            return None, ids
        raise ValueError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")

    def add_request(self, prompt, params: SamplingParams | dict | None = None,
                    request_id: Hashable | None = None, arrival_time: float | None = None,
                    oracle_output_len: int | None = None) -> RequestOutput:
        """Queue a request (``arrival_time``: on the engine clock, default now; a replayed trace passes the
        intended arrival, so a request added late while a step ran counts that wait as queuing;
        ``oracle_output_len``: the true output length, for oracle policies such as ``srpt`` in experiments). Returns its output object; a refused request (empty or over-long prompt, bad
        parameters, a request that can never fit) comes back finished with ``finish_reason == "error"``
        and ``error`` naming the problem, and nothing else is affected."""
        out = self._add(prompt, params, request_id, arrival_time, oracle_output_len)
        if out.finished:
            self.metrics.observe_finished(out)
        self._refresh_gauges()
        return out

    def refuse(self, reason: str, prompt: str | None = None) -> RequestOutput:
        """The output of a request refused before it could be queued (its prompt could not be built, e.g. a
        chat conversation its template cannot render): finished with ``finish_reason == "error"`` and
        ``error == reason``, with its own id, and counted in the metrics like any other refusal."""
        now = self.now()
        out = self._refuse(RequestOutput(self._new_id(), prompt, [], metrics=RequestMetrics(now)), reason, now)
        self.metrics.observe_finished(out)
        return out

    def _new_id(self) -> int:
        """The next automatic request id that no live request holds (a caller may pass integer ids too)."""
        rid = next(self._ids)
        while rid in self._seqs:
            rid = next(self._ids)
        return rid

    def _add(self, prompt, params, request_id, arrival_time, oracle_output_len) -> RequestOutput:
        rid = self._new_id() if request_id is None else check_request_id(request_id)
        now = self.now()
        if rid in self._seqs and not self._release_stopped(rid):
            raise ValueError(f"request id {rid!r} is already live")
        out = RequestOutput(rid, prompt if isinstance(prompt, str) else None, [], metrics=RequestMetrics(now))
        try:
            if arrival_time is not None:
                if (isinstance(arrival_time, bool) or not isinstance(arrival_time, numbers.Real)
                        or not 0 <= arrival_time < float("inf")):
                    raise ValueError(f"arrival_time must be a finite number >= 0 of seconds on the engine clock "
                                     f"(since the engine started), got {arrival_time!r}")
                out.metrics.arrival_time = min(float(arrival_time), now)
            if oracle_output_len is not None:
                if (isinstance(oracle_output_len, bool) or not isinstance(oracle_output_len, numbers.Integral)
                        or oracle_output_len < 1):
                    raise ValueError(f"oracle_output_len must be an int >= 1 (the true output length), "
                                     f"got {oracle_output_len!r}")
                oracle_output_len = int(oracle_output_len)
            sp = SamplingParams.coerce(params)
            if sp.logprobs is not None:
                out.logprobs = []
            if sp.prompt_logprobs is not None and not self.runner.config.prompt_logprobs:
                raise ValueError("SamplingParams.prompt_logprobs needs an engine built with "
                                 "EngineConfig.enable_prompt_logprobs=True")
            text, ids = self._tokenize(prompt)
            out.prompt_token_ids = ids
            if not ids:
                raise ValueError("the prompt is empty")
            if sp.prompt_logprobs is not None:
                out.prompt_logprobs = [None] * len(ids)
                out.prompt_logprob_ranks = [None] * len(ids)
            if len(ids) >= self.max_model_len:
                raise ValueError(
                    f"the prompt has {len(ids)} tokens; max_model_len is {self.max_model_len} (prompt plus at least "
                    "one new token)"
                )
            if sp.stop and self.tokenizer is None:
                raise ValueError("SamplingParams.stop needs a tokenizer to match text; this model has none "
                                 "(use stop_token_ids)")
            vocab = self.model.config.vocab_size
            bad = next((t for t in sp.stop_token_ids if t >= vocab), None)
            if bad is not None:  # it could never be generated, so never stop anything
                raise ValueError(f"SamplingParams.stop_token_ids holds {bad}, outside the model's vocabulary "
                                 f"[0, {vocab})")
            eos = frozenset() if sp.ignore_eos else self._eos_ids
            adjust = request_adjustments(sp, eos, vocab)
        except ValueError as e:
            return self._refuse(out, str(e), now)
        max_new = min(sp.max_tokens, self.max_model_len - len(ids))
        cached = self.config.enable_prefix_caching and sp.prompt_logprobs is None  # a cached page has no logits
        keys = prefix_page_keys(ids, self.config.page_size) if cached else ()
        req = Request(rid, len(ids), max_new, arrival_time=out.metrics.arrival_time,
                      oracle_output_len=oracle_output_len, prefix_hashes=keys)
        seed = sp.seed if sp.seed is not None else self._rng.randrange(2**32)
        seq = SequenceState(req, sp, seed, ids, out, eos, adjust=adjust, prefix_cached=cached)
        if not self.scheduler.add(req, now):
            return self._refuse(out, f"the scheduler refused the request: {req.reject_reason}", now)
        self._seqs[rid] = seq
        return out

    def _retire(self, request_id: Hashable) -> "SequenceState | None":
        """Forget a live request (its output is final, or about to be): its penalty slot, if any, goes back."""
        seq = self._seqs.pop(request_id, None)
        if seq is not None:
            self._penalty_slots.release(request_id)
        return seq

    def _refuse(self, out: RequestOutput, reason: str, now: float) -> RequestOutput:
        out.finish_reason = "error"
        out.error = reason
        out.metrics.finish_time = now
        return out

    def _release_stopped(self, request_id: Hashable) -> bool:
        """Release a request whose output is already finished by a stop condition while the scheduler, which
        async scheduling tells one iteration late, still holds it (its output is left as it is). Returns False
        if ``request_id`` is no such request. Its token in flight, if any, is dropped as for an abort."""
        if request_id not in self._stopped:
            return False
        self._stopped.remove(request_id)
        self._abort_stopped([request_id])
        self._release_host_pages()
        return True

    def abort(self, request_id: Hashable) -> bool:
        """Cancel a live request; its pages are freed at once. Returns False if it is not live (a request whose
        output is finished is not: its output stays as it is)."""
        if self._release_stopped(request_id):
            return False
        seq = self._retire(request_id)
        if seq is None:
            return False
        self.scheduler.abort(request_id)
        self._release_host_pages()
        seq.output.finish_reason = "abort"
        seq.output.metrics.finish_time = self.now()
        seq.output.text = detokenize(self.tokenizer, seq)
        self.metrics.observe_finished(seq.output)
        self._refresh_gauges()
        return True

    def has_unfinished(self) -> bool:
        """True while a request is live or an iteration's tokens are still to be read."""
        return bool(self._seqs) or self._in_flight is not None

    def get_output(self, request_id: Hashable) -> RequestOutput | None:
        """The output of a live request (None once its output is finished)."""
        seq = self._seqs.get(request_id)
        return seq.output if seq and not seq.output.finished else None

    # ----------------------------------------------------------------------------------------- the loop

    def step(self) -> list[RequestOutput]:
        """Run one iteration; returns the outputs that changed (a new token, or finished).

        With ``async_scheduling`` the step dispatched here is still running when this returns: its tokens
        come back from the next call (see the module docstring). An exception inside the iteration (Ctrl-C,
        a device error) aborts every live request and gives the engine a fresh scheduler before it propagates:
        the policy would otherwise be left mid-iteration, refusing every later call."""
        try:
            changed = self._step()
        except BaseException as e:
            self._reset_after(e)
            raise
        for out in changed:
            if out.finished:
                self.metrics.observe_finished(out)
        self._refresh_gauges()
        return changed

    def _refresh_gauges(self) -> None:
        """The metrics' gauges after an iteration, an arrival or an abort (O(batch))."""
        running = sum(1 for rid in self._batch_ids if rid in self._seqs)
        b = self.scheduler.blocks
        self.metrics.set_gauges(running, len(self._seqs) - running, b.num_used_device_blocks,
                                b.num_usable_device_blocks, b.num_used_host_blocks, b.num_host_blocks)

    def _reset_after(self, error: BaseException) -> None:
        """Abort every live request (``finish_reason == "abort"``, ``error`` naming ``error``), forget the
        iteration in flight, release every host page and replace the scheduler by a fresh one of the same
        policy, configuration and cost model. Device pages need no release: the new scheduler owns them all."""
        now = self.now()
        for seq in self._seqs.values():
            out = seq.output
            if out.finish_reason is None:  # (an output finished by a stop was counted when step returned it)
                out.finish_reason = "abort"
                out.metrics.finish_time = now
                self.metrics.observe_finished(out)
            out.error = out.error or f"aborted: the engine step was interrupted by {type(error).__name__}: {error}"
        self._seqs.clear()
        self._penalty_slots.clear()
        self._in_flight = None
        self._stopped = []
        self.kv.retain_host(())
        old = self.scheduler
        self.scheduler = make_scheduler(old.name, old.config, old.cost_model)
        self._batch_ids = []
        self._refresh_gauges()

    def _step(self) -> list[RequestOutput]:
        sched = self.scheduler
        changed: list[RequestOutput] = []
        now = self.now()
        flight, self._in_flight = self._in_flight, None
        done: list[Request] = []
        if flight is not None:
            done = self._close_iteration(flight, now)
        else:
            stopped, self._stopped = self._stopped, []
            self._abort_stopped(stopped)
        plan = sched.schedule(now)
        self.stats["steps"] += 1
        for req, reason in plan.rejected:
            seq = self._retire(req.request_id)
            if seq is not None:
                changed.append(self._refuse(seq.output, f"the scheduler refused the request: {reason}", now))
        launched = None
        if plan.is_empty:
            self._release_host_pages()  # a request dropped while on the host
            sched.on_step_end(plan, now, 0.0)
        else:
            launched = self._dispatch(plan, now, flight)
        if flight is not None:
            changed += self._collect(flight)
            self._finalize(done)
        if launched is not None:
            if self.async_scheduling:
                self._in_flight = launched
            else:  # wait for this step and close its iteration now
                changed += self._collect(launched)
                self._finalize(self._close_iteration(launched, self.now()))
        self.stats["compiles_after_warmup"] = self._watch.count
        return changed

    def _dispatch(self, plan, now: float, flight: "InFlight | None") -> "InFlight":
        """Run the plan's critical-path copies and dispatch its step (or its copies alone). Rows whose newest
        token is the one ``flight`` is sampling get a placeholder, which the step itself takes from ``flight``'s
        tokens on the device: nothing here waits for the device."""
        self.runner.copy("out", plan.sync_swap_out, request_runs(plan.sync_swap_out, plan.swapped_out))
        self.runner.copy("in", plan.sync_swap_in)
        st = self.stats
        st["blocks_out"] += len(plan.sync_swap_out) + len(plan.swap_out)
        st["blocks_in"] += len(plan.sync_swap_in) + len(plan.swap_in)
        st["drops"] += len(plan.dropped)
        pending = flight.sampler_index if flight is not None else {}
        rows: list[BatchRow] = []
        samplers: list[SequenceState | None] = []  # per row: the sequence that samples a token, or None
        fills: list[tuple[int, int]] = []  # (row, index in flight's tokens) of placeholder tokens
        plp_rows, plp_at, packed = [], [], 0  # prompt logprobs: packed positions, (sequence, prompt position)
        work = [(e.request, e.num_tokens, e.samples_token) for e in plan.prefill] + [(r, 1, True) for r in plan.decode]
        busy = {r.request_id for r, _, _ in work}
        self._batch_ids = list(busy)
        rebuilds: list[tuple] = []  # (slot, prompt ids, generated ids) of penalty slots to rebuild first
        for r, n, samples in work:
            seq = self._seqs[r.request_id]
            c = r.num_computed_tokens
            waiting = pending.get(r.request_id)
            if waiting is not None and flight.samplers[waiting] is not seq:  # an earlier request of this id
                waiting = None  # (aborted or stopped, then added again) is sampling that token
            known = seq.num_known_tokens
            if waiting is not None and c + n > known:  # the row ends with the token in flight
                if c + n != known + 1:
                    raise RuntimeError(f"request {r.request_id!r}: a step asks for tokens past the one in flight")
                fills.append((len(rows), waiting))
                tokens = seq.token_slice(c, n - 1) + [0]
            else:
                tokens = seq.token_slice(c, n)
            drawn = len(seq.output.token_ids) + (waiting is not None)
            if r.prefix_hashes and c == r.num_cached_tokens:  # the first chunk of a (re)start, which looked
                # the prefix cache up (later chunks and decodes have computed more than the cache gave)
                if seq.output.metrics.first_scheduled_time is None:  # the output reports the first start's
                    seq.output.num_cached_tokens = c  # (prompt) tokens, as usage does; restarts are internal
                st["prefix_cache_queries"] += r.num_tokens
                st["prefix_cache_hits"] += c
            pen = None
            if seq.params.has_penalties:
                pen, rebuild = self._penalty_slots.row(r.request_id, busy, fresh=c == 0 and drawn == 0,
                                                        samples=samples, in_flight=waiting is not None)
                if rebuild:
                    rebuilds.append((pen.slot, seq.prompt_ids, seq.output.token_ids))
                    self.stats["penalty_rebuilds"] += 1
            adjust = seq.adjust[drawn >= seq.params.min_tokens] if samples else ()
            rows.append(BatchRow(tokens, c, r.blocks, (seq.params, seq.seed, drawn), pen, adjust))
            for pos in seq.prompt_logprob_targets(c, n):
                plp_rows.append(packed + pos - 1 - c)
                plp_at.append((seq, pos))
            packed += n
            samplers.append(seq if samples else None)
            if seq.output.metrics.first_scheduled_time is None:
                seq.output.metrics.first_scheduled_time = now
        for r in plan.dropped + plan.swapped_out:
            seq = self._seqs.get(r.request_id)
            if seq is not None:
                seq.output.metrics.num_preemptions += 1
        if rebuilds:
            self.runner.rebuild_penalty_slots(rebuilds)
        prepared = self.runner.prepare(rows) if rows else None
        for row, j in fills:  # taken from flight's tokens on the device: no wait here
            prepared.feed_last_token(row, j)
        outputs = plp = None
        if prepared is not None:
            outputs = self.runner.launch(prepared, plan.swap_out, plan.swap_in,
                                         flight.outputs.tokens if fills else None,
                                         request_runs(plan.swap_out, plan.swapped_out))
            self.stats["compute_steps"] += 1
            if plp_rows:
                plp = self.runner.prompt_logprobs(outputs.hidden, plp_rows, [s.prompt_ids[p] for s, p in plp_at])
        else:
            self.runner.copy("out", plan.swap_out, request_runs(plan.swap_out, plan.swapped_out))
            self.runner.copy("in", plan.swap_in)
        self._release_host_pages(plan)
        return InFlight(plan, now, samplers, outputs, prompt_logprobs=plp, prompt_positions=plp_at)

    def _collect(self, flight: "InFlight") -> list[RequestOutput]:
        """Append a finished step's tokens to its sequences and check their stop conditions. Their time (first
        token, finish) is when the tokens reached the host, after the waits for the device here."""
        changed = []
        fill_prompt_logprobs(flight)  # before the tokens: a request's first token comes with all of them
        tokens = flight.read()
        page = self.config.page_size
        want = any(seq is not None and seq.params.logprobs is not None for seq in flight.samplers)
        logprobs = flight.read_logprobs() if want else None
        end = self.now()
        for row, (seq, tok) in enumerate(zip(flight.samplers, tokens)):
            if seq is None or seq.output.finished:  # no token, aborted, or stopped while this step ran
                continue
            out = seq.output
            tok = int(tok)
            out.token_ids.append(tok)
            out.new_token_ids = [tok]
            known = seq.num_known_tokens
            if seq.prefix_cached and known % page == 0:  # tok completes a page: key it before the step that
                # computes tok ends (that step registers the page in the cache)
                keys = seq.request.prefix_hashes
                keys += (next_page_key(keys[-1] if keys else b"", seq.token_slice(known - page, page)),)
                seq.request.prefix_hashes = keys
            if seq.params.logprobs is not None:
                out.logprobs.append(logprob_dict(tok, seq.params.logprobs, logprobs, row))
            self.stats["tokens"] += 1
            if out.metrics.first_token_time is None:
                out.metrics.first_token_time = end
            if check_stop(self.tokenizer, seq, tok):  # sets the final text too
                out.metrics.finish_time = end
                self._stopped.append(seq.request.request_id)
            changed.append(out)
        return changed

    def _close_iteration(self, flight: "InFlight", now: float) -> list[Request]:
        """``scheduler.on_step_end`` for ``flight``'s plan. Requests that hit a stop condition are reported
        as finished in the first iteration that sampled for them after the stop was seen; the others the
        scheduler finishes itself (``max_tokens``, context). Stopped requests outside this plan are aborted."""
        stopped, self._stopped = self._stopped, []
        early = [rid for rid in stopped if rid in flight.sampler_index]
        done = self.scheduler.on_step_end(flight.plan, now, max(0.0, now - flight.start), early)
        self._abort_stopped([rid for rid in stopped if rid not in flight.sampler_index])
        return done

    def _abort_stopped(self, stopped: Sequence[Hashable]) -> None:
        """Release stopped requests that no iteration in flight will report as finished."""
        for rid in stopped:
            self.scheduler.abort(rid)
            self._retire(rid)

    def _finalize(self, done: Sequence[Request]) -> None:
        """Retire requests the scheduler finished (their outputs already hold every token)."""
        end = self.now()
        for req in done:
            seq = self._retire(req.request_id)
            if seq is None:
                continue
            out = seq.output
            if out.finish_reason is None:  # a stopped output has its text already (``_collect``)
                out.finish_reason = "length"
                out.text = detokenize(self.tokenizer, seq)
            if out.metrics.finish_time is None:
                out.metrics.finish_time = end

    def _release_host_pages(self, plan=None) -> None:
        """Give back the host buffers of pages the scheduler no longer needs: the sources of ``plan``'s
        swap-ins (already issued; a transfer in flight keeps its buffer alive), and the pages of requests
        dropped or aborted while on the host (found when the cache holds more host ids than the scheduler's
        host-resident requests, which is rare)."""
        kv = self.kv
        if plan is not None:
            kv.release_host(h for h, _ in plan.sync_swap_in)
            kv.release_host(h for h, _ in plan.swap_in)
        blocks = self.scheduler.blocks
        if kv.num_host_ids > blocks.num_used_host_blocks - blocks.num_pending_host_blocks:
            kv.retain_host(h for r in self.scheduler.requests.values() if r.kv_location is KVLocation.HOST
                           for h in r.blocks)

    # ----------------------------------------------------------------------------------------- driving

    def run_until_done(self) -> None:
        while self.has_unfinished():
            self.step()

    def close(self) -> None:
        self._watch.__exit__(None, None, None)
