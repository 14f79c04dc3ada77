"""Built-in length profiles: the filtered (prompt_len, output_len) pairs of a dataset, stored as small JSON.

A profile keeps the pairs themselves (a few thousand integers), so sampling from it preserves the joint
prompt/output distribution exactly; it holds numbers derived from the data, never the text. Profiles live in
``eval/data/<dataset>_lengths.json`` and are written by ``scripts/derive_length_profiles.py``. File layout::

    {"format": "jserve-length-profile/1", "dataset": "sharegpt",
     "provenance": {...source file, tokenizer, filter, counts...},
     "summary": {"prompt": {"mean": ..., "p50": ...}, "output": {...}, "pairs": N},
     "prompt_lens": [...], "output_lens": [...]}
"""

from __future__ import annotations

import functools
import json
from importlib import resources
from pathlib import Path

import numpy as np

from eval.workloads.datasets import LengthPairs

PROFILE_FORMAT = "jserve-length-profile/1"
PROFILE_DATASETS = ("sharegpt", "alpaca")


def profile_path(dataset: str) -> Path:
    """Where the built-in profile of ``dataset`` lives (inside the installed ``eval.data`` package)."""
    if dataset not in PROFILE_DATASETS:
        raise ValueError(f"no built-in length profile for dataset {dataset!r}; expected one of {PROFILE_DATASETS}")
    return Path(str(resources.files("eval.data").joinpath(f"{dataset}_lengths.json")))


def length_summary(pairs: LengthPairs) -> dict:
    """Mean and quantiles of prompt and output lengths, and their correlation (for docs and provenance)."""
    def stats(x: np.ndarray) -> dict:
        q = np.percentile(x, [10, 25, 50, 75, 90, 95, 99])
        return {"mean": round(float(x.mean()), 2), "std": round(float(x.std()), 2), "min": int(x.min()),
                **{f"p{k}": round(float(v), 1) for k, v in zip((10, 25, 50, 75, 90, 95, 99), q)},
                "max": int(x.max())}

    corr = float(np.corrcoef(pairs.prompt_lens, pairs.output_lens)[0, 1]) if len(pairs) > 1 else float("nan")
    return {"pairs": len(pairs), "prompt": stats(pairs.prompt_lens), "output": stats(pairs.output_lens),
            "prompt_output_corr": round(corr, 4)}


def write_profile(path: Path, dataset: str, pairs: LengthPairs, provenance: dict) -> None:
    head = {"format": PROFILE_FORMAT, "dataset": dataset, "provenance": provenance,
            "summary": length_summary(pairs)}
    # The two long integer lists go on one line each, so the file stays small and diffable.
    text = (json.dumps(head, indent=1)[:-2]
            + ',\n "prompt_lens": ' + json.dumps([int(x) for x in pairs.prompt_lens])
            + ',\n "output_lens": ' + json.dumps([int(x) for x in pairs.output_lens]) + "\n}\n")
    path.write_text(text, encoding="utf-8")


def read_profile(path: str | Path) -> tuple[LengthPairs, dict]:
    """Read and validate a profile file; returns the pairs and the whole document (provenance, summary)."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"length profile {p} does not exist (run scripts/derive_length_profiles.py)")
    except json.JSONDecodeError as exc:
        raise ValueError(f"length profile {p} is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("format") != PROFILE_FORMAT:
        raise ValueError(f"length profile {p}: 'format' must be {PROFILE_FORMAT!r}")
    arrays = []
    for key in ("prompt_lens", "output_lens"):
        values = doc.get(key)
        if not isinstance(values, list) or not values or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
            raise ValueError(f"length profile {p}: {key!r} must be a non-empty list of integers >= 0")
        arrays.append(np.asarray(values, dtype=np.int64))
    if arrays[0].shape != arrays[1].shape:
        raise ValueError(f"length profile {p}: 'prompt_lens' ({arrays[0].size}) and 'output_lens' "
                         f"({arrays[1].size}) differ in length")
    return LengthPairs(arrays[0], arrays[1]), doc


@functools.lru_cache(maxsize=None)
def load_profile(dataset: str) -> LengthPairs:
    """The built-in profile's pairs for ``dataset`` (cached per process)."""
    pairs, _ = read_profile(profile_path(dataset))
    return pairs
