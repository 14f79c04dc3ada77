"""Real-dataset loaders: ShareGPT and Alpaca JSON files -> filtered (prompt_len, output_len) token pairs.

The extraction and the filter follow the FastServe artifact's client
(``benchmarks/benchmark-serving/benchmark-serving.py``, ``sample_requests``):

- ShareGPT (``ShareGPT_V3_unfiltered_cleaned_split.json``: a list of ``{"id", "conversations": [{"from",
  "value"}, ...]}``): keep records with >= 2 turns; prompt = turn 0's value, output = turn 1's value, whatever
  their roles (the artifact does not look at ``from``).
- Alpaca (``alpaca_data.json``: a list of ``{"instruction", "input", "output"}``): prompt = instruction + input,
  concatenated with no separator (exactly as the artifact); output = output.
- Tokenize both texts; drop a pair if prompt < 4 **and** output < 4 tokens (the artifact prunes only when both
  are short; later vLLM scripts prune when either is), or if prompt > max_prompt_len (1024) or prompt + output >
  max_total_len (2048).
- jserve adds one rule: a pair whose prompt or output has 0 tokens is dropped (an empty prompt cannot be
  prefilled and an empty output has no normalized latency; the artifact's OPT tokenizer adds a BOS token to
  every text, so it never saw 0). Such pairs are counted separately.

Errors name the file and the record index (and id where there is one).
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from eval.workloads.tokenizer import load_token_counter

MIN_SHORT_LEN = 4  # the artifact prunes a pair when prompt and output are both shorter than this


@dataclass(frozen=True)
class LengthPairs:
    """Token lengths of (prompt, reference output) pairs, in source order."""

    prompt_lens: np.ndarray  # [num_pairs] int64
    output_lens: np.ndarray  # [num_pairs] int64

    def __post_init__(self) -> None:
        if self.prompt_lens.shape != self.output_lens.shape or self.prompt_lens.ndim != 1:
            raise ValueError(f"LengthPairs: prompt_lens {self.prompt_lens.shape} and output_lens "
                             f"{self.output_lens.shape} must be 1-D of equal length")

    def __len__(self) -> int:
        return int(self.prompt_lens.shape[0])


@dataclass(frozen=True)
class FilterCounts:
    """How many records a loader saw and why it dropped the others (for provenance and docs)."""

    records: int  # records in the file
    pairs: int  # records that yield a (prompt, output) pair (ShareGPT: >= 2 turns)
    dropped_too_short: int  # prompt < 4 and output < 4 tokens
    dropped_too_long: int  # prompt > max_prompt_len or prompt + output > max_total_len
    dropped_empty: int  # prompt or output of 0 tokens (jserve's rule)
    kept: int


def filter_pairs(prompt_lens: np.ndarray,  # [num_pairs] int
                 output_lens: np.ndarray,  # [num_pairs] int
                 max_prompt_len: int = 1024, max_total_len: int = 2048) -> tuple[np.ndarray, dict[str, int]]:
    """The artifact's filter plus the empty-text rule. Returns the keep mask [num_pairs] and drop counts."""
    p = np.asarray(prompt_lens, dtype=np.int64)
    o = np.asarray(output_lens, dtype=np.int64)
    too_short = (p < MIN_SHORT_LEN) & (o < MIN_SHORT_LEN)
    too_long = ~too_short & ((p > max_prompt_len) | (p + o > max_total_len))
    empty = ~too_short & ~too_long & ((p == 0) | (o == 0))
    keep = ~(too_short | too_long | empty)
    return keep, {"dropped_too_short": int(too_short.sum()), "dropped_too_long": int(too_long.sum()),
                  "dropped_empty": int(empty.sum())}


def _read_json_list(path: Path) -> list:
    if not path.is_file():
        raise FileNotFoundError(f"dataset file {path} does not exist")
    try:
        with path.open("r", encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"dataset file {path} is not valid JSON: {exc}") from exc
    except RecursionError:
        raise ValueError(f"dataset file {path} is not a dataset: its JSON is nested too deeply to read") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"dataset file {path} is not UTF-8 text: {exc}") from exc
    if not isinstance(data, list):
        raise ValueError(f"dataset file {path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def _where(path: Path, index: int, record: object) -> str:
    rid = record.get("id") if isinstance(record, dict) else None
    return f"{path}: record {index}" + (f" (id {rid!r})" if rid is not None else "")


def sharegpt_texts(records: list, path: Path) -> list[tuple[str, str]]:
    """(turn 0, turn 1) texts of every record with >= 2 turns."""
    out = []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict) or not isinstance(rec.get("conversations"), list):
            raise ValueError(f"{_where(path, i, rec)}: expected an object with a 'conversations' list "
                             f"(ShareGPT format)")
        conv = rec["conversations"]
        if len(conv) < 2:
            continue
        texts = []
        for t in (0, 1):
            turn = conv[t]
            if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
                raise ValueError(f"{_where(path, i, rec)}: conversations[{t}] needs a string 'value'")
            texts.append(turn["value"])
        out.append((texts[0], texts[1]))
    return out


def alpaca_texts(records: list, path: Path) -> list[tuple[str, str]]:
    """(instruction + input, output) texts of every record; 'input' may be absent (treated as "")."""
    out = []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise ValueError(f"{_where(path, i, rec)}: expected an object with 'instruction', 'input', 'output' "
                             f"(Alpaca format), got {type(rec).__name__}")
        for key in ("instruction", "output"):
            if not isinstance(rec.get(key), str):
                raise ValueError(f"{_where(path, i, rec)}: field {key!r} must be a string (Alpaca format)")
        inp = rec.get("input", "")
        if not isinstance(inp, str):
            raise ValueError(f"{_where(path, i, rec)}: field 'input' must be a string (Alpaca format)")
        out.append((rec["instruction"] + inp, rec["output"]))
    return out


_EXTRACTORS = {"sharegpt": sharegpt_texts, "alpaca": alpaca_texts}


def load_dataset_lengths(dataset: str, path: str | os.PathLike, tokenizer: str | None = None,
                         max_prompt_len: int = 1024, max_total_len: int = 2048) -> tuple[LengthPairs, FilterCounts]:
    """Read, tokenize and filter a real dataset file. Cached per process (keyed on the file's mtime and size)."""
    if dataset not in _EXTRACTORS:
        raise ValueError(f"unknown dataset {dataset!r} for a dataset file; expected one of {tuple(_EXTRACTORS)}")
    p = Path(path).resolve()
    if p.is_dir():
        raise IsADirectoryError(f"dataset file {p} is a directory, not a JSON file")
    if not p.is_file():
        raise FileNotFoundError(f"dataset file {p} does not exist")
    st = p.stat()
    return _load_cached(dataset, str(p), st.st_mtime_ns, st.st_size, tokenizer, max_prompt_len, max_total_len)


@functools.lru_cache(maxsize=8)
def _load_cached(dataset: str, path: str, _mtime_ns: int, _size: int, tokenizer: str | None,
                 max_prompt_len: int, max_total_len: int) -> tuple[LengthPairs, FilterCounts]:
    p = Path(path)
    records = _read_json_list(p)
    texts = _EXTRACTORS[dataset](records, p)
    count = load_token_counter(tokenizer)
    prompt_lens = np.array([count(a) for a, _ in texts], dtype=np.int64)
    output_lens = np.array([count(b) for _, b in texts], dtype=np.int64)
    keep, drops = filter_pairs(prompt_lens, output_lens, max_prompt_len, max_total_len)
    pairs = LengthPairs(prompt_lens[keep], output_lens[keep])
    counts = FilterCounts(records=len(records), pairs=len(texts), kept=len(pairs), **drops)
    if len(pairs) == 0:
        raise ValueError(f"dataset file {p}: no (prompt, output) pair survives the filter ({counts})")
    return pairs, counts
