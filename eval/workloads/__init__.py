"""Workloads for the eval harness: real-dataset loaders, built-in length profiles, synthetic lengths, arrivals.

Public interface (what the simulator, the CLI and the experiments use):

- ``WorkloadSpec`` / ``SyntheticLengths``: a validated description of a workload.
- ``make_workload(spec, seed) -> list[WorkloadRequest]``: deterministic in (spec, seed).
- ``load_dataset_lengths`` (real JSON files), ``load_profile`` (built-in profiles), ``read_trace``,
  ``scale_io_ratio``, ``workload_stats``.

See docs/workloads.md for definitions, file formats and the provenance of the built-in profiles.
"""

from eval.workloads.arrivals import Trace, read_trace
from eval.workloads.datasets import FilterCounts, LengthPairs, filter_pairs, load_dataset_lengths
from eval.workloads.generate import make_workload, workload_stats
from eval.workloads.profiles import load_profile, read_profile
from eval.workloads.spec import ARRIVALS, DATASETS, DISTRIBUTIONS, SyntheticLengths, WorkloadSpec
from eval.workloads.synthetic import scale_io_ratio

__all__ = [
    "ARRIVALS", "DATASETS", "DISTRIBUTIONS", "FilterCounts", "LengthPairs", "SyntheticLengths", "Trace",
    "WorkloadSpec", "filter_pairs", "load_dataset_lengths", "load_profile", "make_workload", "read_profile",
    "read_trace", "scale_io_ratio", "workload_stats",
]
