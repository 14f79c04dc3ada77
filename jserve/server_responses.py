"""OpenAI response bodies from engine outputs (used by ``jserve.server``): the whole-answer JSON and the
Server-Sent Events stream, for completions and chat.

Choices are prompt-major: choice ``index = prompt_index * n + j``. A whole answer returns, per prompt, its
``n`` samples, or with ``best_of > n`` the ``n`` candidates of highest cumulative log-probability, best first
(``jserve.server_fanout.best_choices``). ``usage`` counts each prompt's tokens once (however many choices it
has, as OpenAI and vLLM report) and every returned choice's tokens; on an engine with prefix caching it
also carries OpenAI's ``prompt_tokens_details.cached_tokens`` (per prompt, the most any of its choices took
from the cache). A stream interleaves the choices' chunks
as the engine produces them, each chunk naming its ``index``; each choice ends with its own
``finish_reason`` chunk, then one usage chunk (``stream_options.include_usage``) and ``[DONE]``.

vLLM's ``prompt_logprobs`` (``vllm_prompt_logprobs``): per prompt token, null for the first, then
``{"token id": {"logprob", "rank", "decoded_token"}}`` for the prompt's token and its top k; completions put it
in every choice (its prompt's), chat at the top of the response (one prompt); streamed, in the first chunk of
each choice. Every choice of a prompt shows its sample 0's (``Prepared.prompt_k``).
"""

from __future__ import annotations

import asyncio
import json
from typing import AsyncIterator

from jserve.engine.outputs import RequestOutput
from jserve.engine.sampling import SamplingParams
from jserve.openai_protocol import ApiError, LogprobRenderer
from jserve.server_fanout import FanOut, best_choices
from jserve.server_requests import Prepared

__all__ = ["LOGPROB_FLOOR", "ResponseWriter", "sse", "top_entries", "trim_prompt_logprobs", "vllm_prompt_logprobs"]

LOGPROB_FLOOR = -9999.0  # vLLM's stand-in for a log-probability of -inf (JSON has no infinity)


def top_entries(d: dict[int, float], tok: int, k_engine: int) -> list[tuple[int, float]]:
    """The ``k_engine`` most likely ``(id, logprob)`` of one prompt position, most likely first, from its engine
    dict (``RequestOutput.prompt_logprobs[q]``: the prompt's id ``tok`` first, then the top ids without it)."""
    items = list(d.items())
    if len(items) > k_engine:  # the prompt's id is not among the top k
        return items[1:]
    return sorted(items, key=lambda kv: -kv[1])  # it is (the engine put it first): back in its place


def trim_prompt_logprobs(lps: list, ids: list[int], k_engine: int, k: int) -> list:
    """Prompt log-probabilities computed with the top ``k_engine`` ids, cut to the top ``k`` (same layout)."""
    if k == k_engine:
        return lps
    return [None] + [{ids[q]: lps[q][ids[q]]} | dict(top_entries(lps[q], ids[q], k_engine)[:k])
                     for q in range(1, len(ids))]


def vllm_prompt_logprobs(out: RequestOutput, k_engine: int, k: int, name) -> list[dict | None]:
    """vLLM's ``prompt_logprobs`` of ``out`` (computed with the top ``k_engine``) showing the top ``k``: None for
    the first prompt token, then ``{str(id): {"logprob", "rank", "decoded_token"}}`` with the prompt's token first
    (its rank among the whole vocabulary, ``RequestOutput.prompt_logprob_ranks``) and the top k (ranks 1..k by
    position). ``name(id)`` is a token's text; -inf becomes ``LOGPROB_FLOOR`` (vLLM's)."""
    ids, lps = out.prompt_token_ids, out.prompt_logprobs
    ranks = getattr(out, "prompt_logprob_ranks", None) or [None] * len(ids)

    def entry(t: int, lp: float, rank: int | None) -> dict:
        return {"logprob": max(float(lp), LOGPROB_FLOOR), "rank": rank, "decoded_token": name(t)}

    result: list[dict | None] = [None]
    for q in range(1, len(ids)):
        tok, d = ids[q], lps[q]
        top = top_entries(d, tok, k_engine)
        position = {t: r for r, (t, _) in enumerate(top, 1)}
        rank = ranks[q] if ranks[q] is not None else position.get(tok)
        row = {str(tok): entry(tok, d[tok], rank)}
        for r, (t, lp) in enumerate(top[:k], 1):
            row.setdefault(str(t), entry(t, lp, r))
        result.append(row)
    return result


class _ChoiceStream:
    """One streamed choice's state: the text sent so far, and the tokens whose logprobs were reported."""

    def __init__(self, tokenizer, params: SamplingParams):
        self.sent = 0  # characters of the choice's text already sent
        self.render = LogprobRenderer(tokenizer, params)
        self.reported = 0
        self.echoed = False  # echo: the prompt's text went out (with the first chunk)
        self.started = False  # its first chunk went out (it carries prompt_logprobs)

    def delta(self, out: RequestOutput) -> str:
        """The text of ``out`` not sent yet. ``AsyncLLMEngine.generate`` gives each output its text so far
        (``IncrementalDetokenizer``: no incomplete character, no tail that may become a stop string; each a
        prefix of the next, the last the final text), so the chunks concatenate to the final text and nothing
        here decodes again."""
        if len(out.text) <= self.sent:
            return ""
        text, self.sent = out.text[self.sent:], len(out.text)
        return text


def sse(payload: dict | str) -> str:
    """One Server-Sent Events ``data:`` line."""
    text = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n"


class ResponseWriter:
    """Builds the bodies of one served model's responses."""

    def __init__(self, tokenizer, model_name: str, cached_tokens: bool = False):
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.cached_tokens = cached_tokens  # usage reports prompt_tokens_details.cached_tokens

    def _head(self, prep: Prepared, chunk: bool) -> dict:
        if prep.kind == "completion":
            obj = "text_completion"  # OpenAI names completion chunks the same
        else:
            obj = "chat.completion.chunk" if chunk else "chat.completion"
        return {"id": prep.request_id, "object": obj, "created": prep.created, "model": self.model_name}

    def _usage(self, prep: Prepared, outs: list[RequestOutput]) -> dict:
        """Each prompt counted once, every returned choice's tokens (``outs``: the same number per prompt,
        prompt-major)."""
        prompt = sum(map(len, prep.prompts))
        completion = 0 if prep.echo_only else sum(len(o.token_ids) for o in outs)
        usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
        if self.cached_tokens:
            per = len(outs) // len(prep.prompts)
            cached = sum(max((o.num_cached_tokens for o in outs[i * per:(i + 1) * per]), default=0)
                         for i in range(len(prep.prompts)))
            usage["prompt_tokens_details"] = {"cached_tokens": cached}
        return usage

    def _logprobs(self, prep: Prepared, params: SamplingParams, out: RequestOutput, start: int = 0,
                  render: LogprobRenderer | None = None) -> dict | None:
        """The choice's ``logprobs`` object for tokens ``start ..`` (None when the client did not ask); a
        stream passes its own ``render`` (it keeps the text offsets of earlier chunks)."""
        if not prep.logprobs or out.logprobs is None:
            return None
        render = render or LogprobRenderer(self.tokenizer, params)
        ids = out.token_ids[: len(out.logprobs)]  # aligned: one dict per token
        if prep.echo is not None:  # the prompt's tokens first (the first has none: null)
            gen = [] if prep.echo_only else ids
            plp = trim_prompt_logprobs(out.prompt_logprobs, out.prompt_token_ids, prep.prompt_k(0), params.logprobs)
            return render.completion(out.prompt_token_ids + gen, plp + out.logprobs[: len(gen)], start)
        return (render.completion if prep.kind == "completion" else render.chat)(ids, out.logprobs, start)

    def _prompt_logprobs(self, prep: Prepared, leader: RequestOutput) -> list[dict | None] | None:
        """The ``prompt_logprobs`` field of a prompt whose sample 0 gave ``leader`` (None: not asked)."""
        if prep.prompt_logprobs is None:
            return None
        names = LogprobRenderer(self.tokenizer, prep.params[0])
        return vllm_prompt_logprobs(leader, prep.prompt_k(0), prep.prompt_logprobs, lambda t: names.token(t)[0])

    # ------------------------------------------------------------------ the whole answer

    def response(self, prep: Prepared, finals: list[RequestOutput]) -> dict:
        """The body for every sub-request's final output (``finals[k]``, sub-request order)."""
        choices, returned, plps = [], [], []
        for i, params in enumerate(prep.params):
            candidates = finals[i * prep.best_of:(i + 1) * prep.best_of]
            chosen = best_choices(candidates, prep.n) if prep.best_of > prep.n else candidates
            plps.append(self._prompt_logprobs(prep, finals[prep.leader(i)]))
            for j, out in enumerate(chosen):
                choice = self._choice(prep, params, i * prep.n + j, out, i)
                if plps[i] is not None and prep.kind == "completion":
                    choice["prompt_logprobs"] = plps[i]
                choices.append(choice)
                returned.append(out)
        body = self._head(prep, chunk=False) | {"choices": choices, "usage": self._usage(prep, returned)}
        if plps[0] is not None and prep.kind == "chat":  # one prompt: vLLM puts it beside the choices
            body["prompt_logprobs"] = plps[0]
        if prep.return_token_ids and len(prep.prompts) == 1:
            body["prompt_token_ids"] = list(prep.prompts[0])
        return body

    def _choice(self, prep: Prepared, params: SamplingParams, index: int, out: RequestOutput, prompt: int) -> dict:
        lp = self._logprobs(prep, params, out)
        if prep.kind == "completion":
            text = out.text if prep.echo is None else prep.echo[prompt] + ("" if prep.echo_only else out.text)
            choice = {"index": index, "text": text, "logprobs": lp, "finish_reason": out.finish_reason}
        else:
            choice = {"index": index, "message": {"role": "assistant", "content": out.text}, "logprobs": lp,
                      "finish_reason": out.finish_reason}
        if prep.return_token_ids:
            choice["token_ids"] = [] if prep.echo_only else list(out.token_ids)
            if len(prep.prompts) > 1:  # several prompts: each choice carries its prompt's ids
                choice["prompt_token_ids"] = list(prep.prompts[prompt])
        return choice

    # ------------------------------------------------------------------ the stream

    def _chunk(self, prep: Prepared, index: int, text: str | None, new_ids: list[int], finish: str | None,
               role: bool = False, logprobs: dict | None = None, prompt_logprobs: list | None = None) -> dict:
        if prep.kind == "completion":
            choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
            if prompt_logprobs is not None:
                choice["prompt_logprobs"] = prompt_logprobs
        else:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        if prep.return_token_ids:
            choice["token_ids"] = list(new_ids)
        body = self._head(prep, chunk=True) | {"choices": [choice]}
        if prompt_logprobs is not None and prep.kind == "chat":
            body["prompt_logprobs"] = prompt_logprobs
        if prep.include_usage:
            body["usage"] = None
        return body

    async def chunks(self, prep: Prepared, fan: FanOut) -> AsyncIterator[str]:
        """The SSE body: a role chunk per choice (chat), one chunk per engine output that adds text to a choice
        (or ids, with ``return_token_ids`` or on a model without a tokenizer, whose chunks have empty text; a
        choice's last chunk carries its ``finish_reason``), a usage chunk if asked, ``[DONE]``. With logprobs, a
        chunk carries those of every token of its choice not reported by an earlier chunk; each choice's first
        chunk (chat: its role chunk) carries its prompt's ``prompt_logprobs`` if asked. Streams have
        ``best_of == n``, so sub-request ``k`` is choice ``k``. A failure mid-stream (the engine thread stopped,
        a sub-request refused) is an ``error`` event before ``[DONE]``. Cancelled when the client disconnects;
        every sub-request still running is then aborted."""
        subs = fan.subs
        states = [_ChoiceStream(self.tokenizer, s.params) for s in subs]
        plps: dict[int, list | None] = {}  # prompt -> its prompt_logprobs field (every sample 0 has started)

        async def first_chunk_plp(k: int) -> list | None:
            """The ``prompt_logprobs`` of choice ``k``'s chunk: its prompt's in the first one, else None."""
            st, i = states[k], subs[k].prompt
            if st.started:
                return None
            st.started = True
            if i not in plps:  # a long prompt's takes a while: off the event loop
                plps[i] = await asyncio.to_thread(self._prompt_logprobs, prep, fan.first[prep.leader(i)])
            return plps[i]

        async def event(body: dict) -> str:
            """``sse(body)``; a chunk with prompt log-probabilities is serialized off the event loop."""
            if "prompt_logprobs" in body or "prompt_logprobs" in body["choices"][0]:
                return await asyncio.to_thread(sse, body)
            return sse(body)

        try:
            if prep.kind == "chat":
                for k in range(len(subs)):
                    plp = await first_chunk_plp(k)
                    yield await event(self._chunk(prep, k, None, [], None, role=True, prompt_logprobs=plp))
            while not fan.done:
                k, out = await fan.next()
                if out.finish_reason == "error":
                    raise ApiError(400, f"{prep.prompt_field(subs[k].prompt)}: {out.error}")
                st = states[k]
                text = st.delta(out)
                new_ids = out.new_token_ids
                if prep.echo_only:  # the prompt alone: the one generated token is not returned
                    text, new_ids = "", []
                if prep.echo is not None and not st.echoed:  # the first chunk starts with the prompt
                    text, st.echoed = prep.echo[subs[k].prompt] + text, True
                # no empty chunks for held-back text; without a tokenizer tokens have no text: one chunk per
                # output with new ids (its text empty, its logprobs and token_ids when asked)
                if text or out.finished or prep.return_token_ids or (self.tokenizer is None and new_ids):
                    lp = self._logprobs(prep, subs[k].params, out, st.reported, st.render)
                    gen = 0 if prep.echo_only else len(out.token_ids)
                    st.reported = gen + (len(out.prompt_token_ids) if prep.echo is not None else 0)
                    plp = await first_chunk_plp(k)
                    yield await event(self._chunk(prep, k, text, new_ids, out.finish_reason, logprobs=lp,
                                                  prompt_logprobs=plp))
            if prep.include_usage:
                finals = [fan.finals[k] for k in range(len(subs))]
                yield sse(self._head(prep, chunk=True) | {"choices": [], "usage": self._usage(prep, finals)})
        except RuntimeError as e:  # the engine thread stopped mid-stream: say so in the stream
            yield sse(ApiError(500, str(e)).body())
        except ApiError as e:
            yield sse(e.body())
        finally:
            fan.abort()
        yield sse("[DONE]")
