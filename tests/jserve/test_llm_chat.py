"""``LLM.chat``: conversations rendered with the chat template, then generated like ``LLM.generate``.

The tiny Llama (dummy weights) with the byte tokenizer of ``test_server`` (token id = byte value) makes the
rendered prompt hand-computable (``<role>content\\n`` per message, then ``<assistant>``), and its greedy ids are
checked against ``jserve.models.greedy_generate`` (the model's own paged loop, no engine). Malformed
conversations and template refusals come back as error outputs in their place while the others run.
"""

from __future__ import annotations

import pytest

from jserve.engine import LLM, SamplingParams
from jserve.models import greedy_generate, load

from test_server import byte_tokenizer

NEW = 6
PARAMS = SamplingParams(max_tokens=NEW, ignore_eos=True)


@pytest.fixture(scope="module")
def chat_llm():
    model = load("tiny-llama")
    model.tokenizer = byte_tokenizer()
    llm = LLM(model, scheduler="fcfs", max_batch_size=4, max_tokens_per_batch=64, max_model_len=128,
              decode_buckets=(4,), token_buckets=(64,), num_device_blocks=40, num_host_blocks=0, progress=False)
    return llm


def expected(llm, text: str) -> list[int]:
    return greedy_generate(llm.model, list(text.encode()), NEW)


def test_one_conversation_is_rendered_then_generated(chat_llm):
    [out] = chat_llm.chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}], PARAMS)
    text = "<system>Be brief.\n<user>hi\n<assistant>"
    assert out.finish_reason == "length" and out.error is None
    assert out.prompt == text
    assert out.prompt_token_ids == list(text.encode())
    assert out.token_ids == expected(chat_llm, text)


def test_batch_keeps_order_and_refuses_only_the_bad_conversations(chat_llm):
    good1 = [{"role": "user", "content": "one"}]
    bad_content = [{"role": "user", "content": 5}]
    parts = [{"role": "user", "content": [{"type": "text", "text": "tw"}, {"type": "text", "text": "o"}]}]
    no_role = [{"content": "x"}]
    before = chat_llm.engine.metrics.snapshot()["finished"]["error"]
    outs = chat_llm.chat([good1, bad_content, parts, no_role, []], sampling_params=PARAMS)
    assert [o.finish_reason for o in outs] == ["length", "error", "length", "error", "error"]
    assert outs[0].token_ids == expected(chat_llm, "<user>one\n<assistant>")
    assert outs[2].prompt == "<user>two\n<assistant>"  # text parts are joined
    assert outs[2].token_ids == expected(chat_llm, "<user>two\n<assistant>")
    assert "conversation 1: message 0: 'content' must be a string" in outs[1].error
    assert "conversation 3: message 0: 'role' must be a non-empty string" in outs[3].error
    assert "conversation 4: a conversation must be a non-empty list" in outs[4].error
    assert len({o.request_id for o in outs}) == 5
    assert chat_llm.engine.metrics.snapshot()["finished"]["error"] == before + 3
    assert not chat_llm.engine.has_unfinished()


def test_template_override_generation_prompt_and_refusal(chat_llm):
    # A template that sees a message's extra keys and refuses conversations without a system turn.
    template = ("{% if messages[0]['role'] != 'system' %}{{ raise_exception('a system message must come first') }}"
                "{% endif %}{% for m in messages %}[{{ m.get('name', m['role']) }}]{{ m['content'] }}{% endfor %}"
                "{% if add_generation_prompt %}[bot]{% endif %}")
    convs = [[{"role": "system", "content": "s"}, {"role": "user", "name": "ann", "content": "q"}],
             [{"role": "user", "content": "q"}]]
    per_conv = [PARAMS, SamplingParams(max_tokens=2)]
    outs = chat_llm.chat(convs, per_conv, chat_template=template)
    assert outs[0].prompt == "[system]s[ann]q[bot]"
    assert outs[0].token_ids == expected(chat_llm, "[system]s[ann]q[bot]")
    assert outs[1].finish_reason == "error" and "a system message must come first" in outs[1].error
    [plain] = chat_llm.chat([{"role": "user", "content": "hi"}], PARAMS, add_generation_prompt=False)
    assert plain.prompt == "<user>hi\n"
    assert plain.token_ids == expected(chat_llm, "<user>hi\n")


def test_bad_calls_raise(chat_llm):
    conv = [{"role": "user", "content": "hi"}]
    with pytest.raises(ValueError, match="2 sampling parameter sets for 1 conversations"):
        chat_llm.chat(conv, [PARAMS, PARAMS])
    with pytest.raises(ValueError, match="params or sampling_params, not both"):
        chat_llm.chat(conv, PARAMS, sampling_params=PARAMS)
    with pytest.raises(ValueError, match="params or sampling_params, not both"):
        chat_llm.generate("hi", PARAMS, sampling_params=PARAMS)
    tok = chat_llm.tokenizer
    template, tok.chat_template = tok.chat_template, None
    try:
        with pytest.raises(ValueError, match="has no chat template; pass chat_template"):
            chat_llm.chat(conv, PARAMS)
        [out] = chat_llm.chat(conv, PARAMS, chat_template="{{ messages[0]['content'] }}")
        assert out.prompt == "hi" and out.token_ids == expected(chat_llm, "hi")
    finally:
        tok.chat_template = template
    [out] = chat_llm.generate("hi", sampling_params=PARAMS)  # vLLM's keyword
    assert out.token_ids == expected(chat_llm, "hi")


def test_model_without_tokenizer_cannot_chat(chat_llm):
    tok, chat_llm.tokenizer = chat_llm.tokenizer, None
    try:
        with pytest.raises(ValueError, match="no tokenizer, so it cannot render chat messages"):
            chat_llm.chat([{"role": "user", "content": "hi"}])
    finally:
        chat_llm.tokenizer = tok


def test_a_chat_prompt_gets_what_its_template_writes_and_a_text_prompt_the_models_bos(chat_llm):
    """With a tokenizer that adds BOS, ``generate(text)`` prepends it (as vLLM does), while ``chat`` feeds the
    rendered template as it is (its template writes every special token it wants; as the server's chat does)."""
    import dataclasses

    plain = chat_llm.tokenizer
    with_bos = dataclasses.replace(plain, bos_token_id=1, add_bos_token=True)
    chat_llm.tokenizer = chat_llm.engine.tokenizer = with_bos
    try:
        [chat] = chat_llm.chat([{"role": "user", "content": "hi"}], PARAMS)
        [text] = chat_llm.generate("<user>hi\n<assistant>", PARAMS)
    finally:
        chat_llm.tokenizer = chat_llm.engine.tokenizer = plain
    assert chat.prompt == "<user>hi\n<assistant>" and chat.prompt_token_ids == list(b"<user>hi\n<assistant>")
    assert text.prompt_token_ids == [1] + list(b"<user>hi\n<assistant>")
    assert chat.token_ids == expected(chat_llm, chat.prompt)


def test_tools_and_template_kwargs_reach_the_template(chat_llm):
    """vLLM's ``LLM.chat(..., tools=, chat_template_kwargs=)``: LLM.chat had neither."""
    template = ("{% if tools %}[tools {{ tools | map(attribute='name') | join(',') }}]{% endif %}"
                "{% if enable_thinking is defined and not enable_thinking %}[no-think]{% endif %}"
                "{{ messages[0]['content'] }}")
    conv = [{"role": "user", "content": "q"}]
    [out] = chat_llm.chat(conv, PARAMS, chat_template=template, tools=[{"name": "add"}, {"name": "mul"}],
                          chat_template_kwargs={"enable_thinking": False})
    assert out.prompt == "[tools add,mul][no-think]q" and out.token_ids == expected(chat_llm, out.prompt)
    [plain] = chat_llm.chat(conv, PARAMS, chat_template=template)
    assert plain.prompt == "q"
    for bad, message in [({"tools": []}, "chat_template_kwargs may not set 'tools'"),
                         ({1: True}, "1 is not a template variable name"),
                         (["enable_thinking"], "chat_template_kwargs must be a dict")]:
        with pytest.raises(ValueError, match=message):
            chat_llm.chat(conv, PARAMS, chat_template_kwargs=bad)
    [out] = chat_llm.chat(conv, PARAMS, tools="add")
    assert out.finish_reason == "error" and "tools must be a list of dicts" in out.error
