"""Real-file loaders: the artifact's extraction and filter, checked on small hand-built files.

The tokenizer here is a word-level tokenizer.json built in the test (one token per whitespace/punctuation
separated word), so every expected length and filter decision is hand-countable.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace

from eval.workloads import WorkloadSpec, filter_pairs, load_dataset_lengths, make_workload


@pytest.fixture(scope="module")
def word_tokenizer(tmp_path_factory) -> str:
    tok = Tokenizer(WordLevel({"[UNK]": 0, "w": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return str(path)


def words(n: int) -> str:
    return " ".join(["w"] * n)


def conv(*turns: tuple[str, str], rid: str = "x_0") -> dict:
    return {"id": rid, "conversations": [{"from": who, "value": text} for who, text in turns]}


def write_json(tmp_path, name, obj) -> str:
    p = tmp_path / name
    p.write_text(json.dumps(obj))
    return str(p)


def test_word_tokenizer_counts_words(word_tokenizer):
    from eval.workloads.tokenizer import load_token_counter

    assert load_token_counter(word_tokenizer)("a b, c") == 4  # a | b | , | c


def test_sharegpt_extraction_and_filter_match_a_hand_count(tmp_path, word_tokenizer):
    records = [
        conv(("human", words(5))),  # 0: one turn -> not a pair
        conv(("human", words(3)), ("gpt", words(3))),  # 1: both < 4 -> too short
        conv(("human", words(3)), ("gpt", words(5))),  # 2: only one short -> kept (3, 5)
        conv(("human", words(1025)), ("gpt", words(1))),  # 3: prompt > 1024 -> too long
        conv(("human", words(1024)), ("gpt", words(1024))),  # 4: total == 2048 -> kept
        conv(("human", words(1024)), ("gpt", words(1025))),  # 5: total 2049 -> too long
        conv(("human", ""), ("gpt", words(5))),  # 6: empty prompt -> jserve's empty rule
        conv(("gpt", words(4)), ("human", words(4))),  # 7: roles ignored, as the artifact -> kept (4, 4)
        conv(("human", words(6)), ("gpt", words(7)), ("human", words(99))),  # 8: turns 0 and 1 only -> (6, 7)
    ]
    pairs, counts = load_dataset_lengths("sharegpt", write_json(tmp_path, "sg.json", records), word_tokenizer)
    assert list(zip(pairs.prompt_lens.tolist(), pairs.output_lens.tolist())) == [(3, 5), (1024, 1024), (4, 4), (6, 7)]
    assert (counts.records, counts.pairs, counts.dropped_too_short, counts.dropped_too_long, counts.dropped_empty,
            counts.kept) == (9, 8, 1, 2, 1, 4)


def test_alpaca_concatenates_instruction_and_input_without_separator(tmp_path, word_tokenizer):
    records = [
        {"instruction": "Give three tips", "input": "for health", "output": "Eat well and sleep"},
        {"instruction": "Say hi", "input": "", "output": "hi"},  # 2 and 1 tokens: both < 4 -> dropped
        {"instruction": "Count to ten now please", "output": words(3)},  # 'input' absent counts as ""
    ]
    pairs, counts = load_dataset_lengths("alpaca", write_json(tmp_path, "al.json", records), word_tokenizer)
    # "Give three tips" + "for health" = "Give three tipsfor health": 4 words, not 5.
    assert pairs.prompt_lens.tolist() == [4, 5] and pairs.output_lens.tolist() == [4, 3]
    assert (counts.records, counts.dropped_too_short, counts.kept) == (3, 1, 2)


def test_filter_pairs_caps_are_parameters():
    keep, drops = filter_pairs(np.array([10, 200, 50]), np.array([10, 10, 500]), max_prompt_len=100, max_total_len=500)
    assert keep.tolist() == [True, False, False]
    assert drops == {"dropped_too_short": 0, "dropped_too_long": 2, "dropped_empty": 0}


@pytest.mark.parametrize("content, dataset, message", [
    ("{not json", "sharegpt", r"sg\.json is not valid JSON"),
    ('{"a": 1}', "sharegpt", r"expected a JSON list"),
    ('[{"id": "a_0", "conversations": []}, {"id": "b_1"}]', "sharegpt", r"record 1 \(id 'b_1'\).*conversations"),
    ('[{"id": "c_0", "conversations": [{"from": "human", "value": 3}, {"value": "x"}]}]', "sharegpt",
     r"record 0 \(id 'c_0'\): conversations\[0\] needs a string 'value'"),
    ('[{"instruction": "a", "input": "", "output": "b"}, {"instruction": "a", "input": ""}]', "alpaca",
     r"record 1: field 'output' must be a string"),
    ('[["not", "an", "object"]]', "alpaca", r"record 0: expected an object"),
    ("[" * 100_000 + "]" * 100_000, "sharegpt", r"sg\.json is not a dataset: its JSON is nested too deeply"),
])
def test_malformed_files_name_the_file_and_record(tmp_path, word_tokenizer, content, dataset, message):
    path = tmp_path / "sg.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_dataset_lengths(dataset, path, word_tokenizer)


def test_missing_file_and_unknown_dataset(tmp_path, word_tokenizer):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_dataset_lengths("sharegpt", tmp_path / "nope.json", word_tokenizer)
    with pytest.raises(ValueError, match="unknown dataset 'synthetic'"):
        load_dataset_lengths("synthetic", tmp_path / "nope.json", word_tokenizer)


def test_file_where_nothing_survives_the_filter_is_an_error(tmp_path, word_tokenizer):
    path = write_json(tmp_path, "short.json", [conv(("human", "a"), ("gpt", "b"))])
    with pytest.raises(ValueError, match="no \\(prompt, output\\) pair survives"):
        load_dataset_lengths("sharegpt", path, word_tokenizer)


def test_unreadable_tokenizer_is_named(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{}")
    path = write_json(tmp_path, "sg.json", [conv(("human", words(5)), ("gpt", words(5)))])
    with pytest.raises((ValueError, OSError), match="tokenizer"):
        load_dataset_lengths("sharegpt", path, str(bad))


def test_make_workload_samples_a_real_file_without_replacement(tmp_path, word_tokenizer):
    records = [conv(("human", words(4 + i)), ("gpt", words(10 + i))) for i in range(6)]
    path = write_json(tmp_path, "sg.json", records)
    spec = WorkloadSpec(dataset="sharegpt", dataset_path=path, tokenizer=word_tokenizer, num_requests=6, rate=1.0)
    reqs = make_workload(spec, seed=3)
    # All six pairs, each once, joint (prompt, output) pairing intact: output = prompt + 6.
    assert sorted((r.prompt_len, r.output_len) for r in reqs) == [(4 + i, 10 + i) for i in range(6)]
    assert reqs == make_workload(spec, seed=3)
