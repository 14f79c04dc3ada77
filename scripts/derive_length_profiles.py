"""Derive the built-in length profiles (eval/data/<dataset>_lengths.json) from the real samples in shared/data.

Usage (from the repository root)::

    /work/venv/bin/python scripts/derive_length_profiles.py [--data-dir ../shared/data] [--tokenizer PATH]

It tokenizes the ShareGPT and Alpaca samples with the workload loaders (default: the embedded SmolLM2 GGUF
tokenizer), applies the artifact's filter, and writes each filtered (prompt_len, output_len) pair list with its
provenance and summary. For Alpaca it also checks the sample's output lengths against the Sequence-Scheduling
files (LLaMA-tokenized output lengths of a random 20k Alpaca records) and records the comparison. It prints
a table beside the published means (vLLM paper, OPT tokenizer). Re-running it on the same inputs reproduces the
shipped files byte for byte (tests/eval/test_workloads_real_data.py checks the pairs).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from eval.workloads.datasets import LengthPairs, load_dataset_lengths  # noqa: E402
from eval.workloads.profiles import length_summary, write_profile  # noqa: E402
from eval.workloads.tokenizer import load_token_counter, tokenizer_name  # noqa: E402

SOURCES = {
    "sharegpt": ("sharegpt_v3_sample1000.json",
                 "random 1000-record sample (seed 42) of ShareGPT_V3_unfiltered_cleaned_split.json, "
                 "see shared/data/PROVENANCE.md"),
    "alpaca": ("alpaca_data_first1805.json",
               "records 0..1804 of Stanford Alpaca alpaca_data.json (52,002 records), see shared/data/PROVENANCE.md"),
}
SEQSCHED_FILES = ("alpaca_train10k_output_lengths_llama_seqsched.json", "alpaca_val10k_output_lengths_llama_seqsched.json")
PUBLISHED = {"sharegpt": (161.3, 338.0), "alpaca": (19.3, 58.5)}  # mean prompt / output tokens, OPT tokenizer
FILTER = ("artifact filter: drop if prompt < 4 and output < 4 tokens, or prompt > 1024, or prompt + output > 2048; "
          "jserve also drops a pair with a 0-token prompt or output")


def seqsched_check(data_dir: Path, alpaca_file: Path, tokenizer: str | None) -> dict:
    """Compare the sample's output lengths with Sequence-Scheduling's LLaMA-token lengths of 20k random records."""
    entries = []
    for name in SEQSCHED_FILES:
        entries += json.loads((data_dir / name).read_text())
    llama = {int(e["id"]): int(e["L_gt"]) - 1 for e in entries}  # L_gt counts the BOS token
    all_llama = np.array(list(llama.values()), dtype=np.float64)
    records = json.loads(alpaca_file.read_text())
    count = load_token_counter(tokenizer)
    overlap = sorted(i for i in llama if i <= len(records))  # ids are 1-based indices into alpaca_data.json
    ours = np.array([count(records[i - 1]["output"]) for i in overlap], dtype=np.float64)
    theirs = np.array([llama[i] for i in overlap], dtype=np.float64)
    def q(x: np.ndarray) -> dict:
        return {"mean": round(float(x.mean()), 2), "p50": round(float(np.median(x)), 1),
                "p90": round(float(np.percentile(x, 90)), 1), "p99": round(float(np.percentile(x, 99)), 1),
                "max": int(x.max())}

    return {
        "source": "zhengzangw/Sequence-Scheduling data/alpaca-{train,val}-10k-length.json (L_gt - 1 = LLaMA output tokens)",
        "random_20k_llama_output": {"records": int(all_llama.size), **q(all_llama)},
        "overlap_with_sample": {"records": len(overlap), "llama_output": q(theirs), "our_output": q(ours),
                                "mean_ratio_ours_over_llama": round(float(ours.mean() / theirs.mean()), 4),
                                "pearson_r": round(float(np.corrcoef(ours, theirs)[0, 1]), 4)},
    }


def sharegpt_role_check(path: Path, tokenizer: str | None) -> dict:
    """Means under stricter extractions than the artifact's, to explain the gap to the published means.

    The V3 "split" file cuts long conversations into chunks, so many records start with a ``gpt`` turn; the
    artifact (and so our profile) still takes turn 0 as the prompt. Here: only records whose turn 0 is
    ``human`` and turn 1 ``gpt``, and of those only true conversation starts (id ending in ``_0``).
    """
    from eval.workloads.datasets import filter_pairs

    records = json.loads(path.read_text())
    count = load_token_counter(tokenizer)
    out = {}
    for label, want_start in (("human_then_gpt", False), ("human_then_gpt_and_id_0", True)):
        sel = [r for r in records if len(r["conversations"]) >= 2
               and r["conversations"][0]["from"] == "human" and r["conversations"][1]["from"] == "gpt"
               and (not want_start or str(r["id"]).endswith("_0"))]
        p = np.array([count(r["conversations"][0]["value"]) for r in sel])
        o = np.array([count(r["conversations"][1]["value"]) for r in sel])
        keep, _ = filter_pairs(p, o)
        out[label] = {"pairs": len(sel), "kept": int(keep.sum()), "mean_prompt": round(float(p[keep].mean()), 1),
                      "mean_output": round(float(o[keep].mean()), 1)}
    return out


def derive(dataset: str, data_dir: Path, tokenizer: str | None, out_dir: Path) -> dict:
    name, description = SOURCES[dataset]
    path = data_dir / name
    pairs, counts = load_dataset_lengths(dataset, path, tokenizer)
    provenance = {
        "source_file": f"shared/data/{name}", "source_description": description,
        "tokenizer": tokenizer_name(tokenizer), "filter": FILTER,
        "counts": {"records": counts.records, "pairs": counts.pairs, "dropped_too_short": counts.dropped_too_short,
                   "dropped_too_long": counts.dropped_too_long, "dropped_empty": counts.dropped_empty,
                   "kept": counts.kept},
        "published_means_opt_tokenizer": {"prompt": PUBLISHED[dataset][0], "output": PUBLISHED[dataset][1]},
        "script": "scripts/derive_length_profiles.py",
    }
    if dataset == "sharegpt":
        provenance["role_check"] = sharegpt_role_check(path, tokenizer)
    if dataset == "alpaca":
        provenance["output_length_check"] = seqsched_check(data_dir, path, tokenizer)
    write_profile(out_dir / f"{dataset}_lengths.json", dataset, pairs, provenance)
    return {"pairs": pairs, "provenance": provenance}


def report(dataset: str, pairs: LengthPairs, provenance: dict) -> None:
    s = length_summary(pairs)
    pub = PUBLISHED[dataset]
    c = provenance["counts"]
    print(f"{dataset}: {c['records']} records -> {c['pairs']} pairs -> kept {c['kept']} "
          f"(short {c['dropped_too_short']}, long {c['dropped_too_long']}, empty {c['dropped_empty']})")
    for part, published in (("prompt", pub[0]), ("output", pub[1])):
        st = s[part]
        print(f"  {part:6s} mean {st['mean']:7.1f} (published {published:6.1f}, ratio {st['mean'] / published:.2f})"
              f"  p50 {st['p50']:6.0f}  p90 {st['p90']:6.0f}  p99 {st['p99']:6.0f}  max {st['max']}")
    print(f"  prompt/output correlation {s['prompt_output_corr']}")
    if "role_check" in provenance:
        print("  stricter extractions (not used):", json.dumps(provenance["role_check"]))
    if "output_length_check" in provenance:
        print("  Sequence-Scheduling check:", json.dumps(provenance["output_length_check"], indent=1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--tokenizer", default=None, help="tokenizer file or dir (default: embedded SmolLM2 GGUF)")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "eval" / "data")
    args = parser.parse_args(argv)
    if not args.data_dir.is_dir():
        parser.error(f"data directory {args.data_dir} does not exist")
    for dataset in SOURCES:
        result = derive(dataset, args.data_dir, args.tokenizer, args.out_dir)
        report(dataset, result["pairs"], result["provenance"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
