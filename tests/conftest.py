"""Suite-wide test settings.

Parallel runs: ``python -m pytest`` runs the suite on pytest-xdist workers (``-n auto --dist loadfile
--no-loadscope-reorder`` in pyproject.toml), one per CPU this process may use, at most four; each file runs
whole on one worker, so module fixtures are built once. Files that hold ``slow`` tests are handed out
first, so that no worker is left alone with a long file at the end (xdist's own order, most tests first,
sent the few-test slow files last: a 2-core run ended with one worker on a 50 s file). ``-n 0`` runs everything in this process (for ``pdb`` or one
quick test).

Hypothesis runs derandomized by default: the property tests draw the same examples on every run, so the suite
gives the same answer on CI and here (a rare random draw cannot turn a run red). To search further, pick the
``explore`` profile (fresh random draws each run; add a seed to replay one)::

    HYPOTHESIS_PROFILE=explore python -m pytest -q tests/schedulers/test_properties.py
    HYPOTHESIS_PROFILE=explore python -m pytest -q tests/schedulers/test_properties.py --hypothesis-seed=5
"""

import os

from hypothesis import settings

settings.register_profile("repeatable", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))

MAX_WORKERS = 4  # each worker holds its own models and compiled steps (3-4 GB with SmolLM2 and torch)


def pytest_xdist_auto_num_workers(config):
    """``-n auto``: the CPUs this process may run on (not physical cores: a 2-vCPU CI machine gets two)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, MAX_WORKERS))


def pytest_collection_modifyitems(config, items):
    """Files with ``slow`` tests first (a stable sort: each file's tests keep their order)."""
    slow_files = {item.nodeid.split("::")[0] for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.nodeid.split("::")[0] not in slow_files)
