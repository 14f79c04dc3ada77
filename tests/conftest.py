"""Suite-wide test settings.

Parallel runs: ``python -m pytest`` runs the suite on pytest-xdist workers (``-n auto --dist loadfile
--no-loadscope-reorder`` in pyproject.toml), one per CPU this process may use, at most four; each file runs
whole on one worker, so module fixtures are built once. Files that hold ``slow`` tests are handed out
first, so that no worker is left alone with a long file at the end (xdist's own order, most tests first,
sent the few-test slow files last: a 2-core run ended with one worker on a 50 s file). ``-n 0`` runs everything in this process (for ``pdb`` or one
quick test).

One compilation cache for the run: many files build an engine for the same model and step shapes, and
compiling those steps is most of their time on a CPU. The run points JAX's persistent compilation cache at a
fresh temporary folder (removed at the end), shared by the workers and by the ``jserve`` subprocesses that
tests start, so each executable is compiled once per run and loaded from disk after that. A cache load still
counts in ``CompileWatch``, so the "nothing compiles after warm-up" tests are unchanged. Every run starts
cold, so no result depends on an earlier run. A ``JAX_COMPILATION_CACHE_DIR`` already set is used as it is;
``JSERVE_TEST_COMPILE_CACHE=0`` turns the shared cache off.

Hypothesis runs derandomized by default: the property tests draw the same examples on every run, so the suite
gives the same answer on CI and here (a rare random draw cannot turn a run red). To search further, pick the
``explore`` profile (fresh random draws each run; add a seed to replay one)::

    HYPOTHESIS_PROFILE=explore python -m pytest -q tests/schedulers/test_properties.py
    HYPOTHESIS_PROFILE=explore python -m pytest -q tests/schedulers/test_properties.py --hypothesis-seed=5
"""

import os
import shutil
import tempfile

import pytest
from hypothesis import settings

settings.register_profile("repeatable", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))

MAX_WORKERS = 4  # each worker holds its own models and compiled steps (3-4 GB with SmolLM2 and torch)


CACHE_ENV = {
    # Executables that take under this long to compile are not worth a disk round trip (an eager jnp op is
    # a ~10 ms compile; an engine step on SmolLM2 is 1-10 s).
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.2",
    # A size limit turns on JAX's file lock around cache reads and writes: the workers write the same
    # executables at the same moments, and an unlocked reader could see a half-written file.
    "JAX_COMPILATION_CACHE_MAX_SIZE": str(16 << 30),
}


def pytest_configure(config):
    """The run's shared compilation cache (see the module docstring). The controller (or a ``-n 0`` run)
    makes the folder and exports it before anything imports JAX (which reads these variables at import);
    workers and subprocesses inherit the environment."""
    if os.environ.get("JSERVE_TEST_COMPILE_CACHE", "1") == "0" or "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return
    folder = tempfile.mkdtemp(prefix="jserve-test-xla-cache-")
    config._jserve_compile_cache = folder
    os.environ["JAX_COMPILATION_CACHE_DIR"] = folder
    for name, value in CACHE_ENV.items():
        os.environ.setdefault(name, value)


def pytest_unconfigure(config):
    folder = getattr(config, "_jserve_compile_cache", None)
    if folder:
        shutil.rmtree(folder, ignore_errors=True)


def pytest_xdist_auto_num_workers(config):
    """``-n auto``: the CPUs this process may run on (not physical cores: a 2-vCPU CI machine gets two)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, MAX_WORKERS))


@pytest.fixture
def policy_registry(monkeypatch):
    """``schedulers.registry``, its table of policies restored when the test ends: a registration lives in the
    process, and an xdist worker runs many files (a test that lists the registered names would see it)."""
    from schedulers import registry

    monkeypatch.setattr(registry, "_POLICIES", dict(registry._POLICIES))
    return registry


def pytest_collection_modifyitems(config, items):
    """Files with ``slow`` tests first (a stable sort: each file's tests keep their order)."""
    slow_files = {item.nodeid.split("::")[0] for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.nodeid.split("::")[0] not in slow_files)
