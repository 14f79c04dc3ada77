"""The registry, the configuration's validation and presets, and the package's import purity."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from schedulers import POLICY_NAMES, SchedulerConfig, available_policies, make_scheduler

ROOT = Path(__file__).resolve().parents[2]


def test_unknown_policy_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown scheduler policy 'fifo'.*fcfs"):
        make_scheduler("fifo", SchedulerConfig())


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_a_cost_model_without_the_protocol_is_refused(policy):
    """cost_model=5 was accepted by fcfs/srpt/vllm (and would fail at the first priced step) and raised a bare
    AttributeError inside fastserve's constructor."""
    with pytest.raises(TypeError, match=r"make_scheduler: cost_model must be None or an IterationCostModel .*"
                                        r"missing prefill_time, decode_time, step_time, swap_time; got int"):
        make_scheduler(policy, SchedulerConfig(), cost_model=5)


def test_every_registered_policy_builds_and_carries_its_name():
    assert available_policies() == list(POLICY_NAMES)
    for name in POLICY_NAMES:
        s = make_scheduler(name, SchedulerConfig())
        assert s.name == name
        assert s.schedule(0.0).is_empty


def test_mlfq_is_fastserve_without_skip_join():
    s = make_scheduler("mlfq", SchedulerConfig())
    assert s.config.skip_join is False
    assert make_scheduler("fastserve", SchedulerConfig()).config.skip_join is True


@pytest.mark.parametrize(
    "field, value",
    [
        ("block_size", 0),
        ("max_batch_size", -1),
        ("max_tokens_per_batch", 4),  # below max_batch_size
        ("num_device_blocks", 0),
        ("num_host_blocks", -1),
        ("num_host_blocks", 10**30),  # a mistyped size: an error, not an out-of-memory kill
        ("watermark", 1.5),
        ("q0", 0.0),
        ("quantum_ratio", 0.5),
        ("num_queues", 0),
        ("starvation_threshold", -1.0),
        ("starvation_check_interval", 0),
        ("swap_mode", "lazy"),
        ("reserve_blocks", -2),
        ("offload_ranking", "random"),
        ("promotion", "halfway"),
        ("swap_overlap_factor", float("nan")),
        ("reserved_device_ids", (5000,)),
        ("skip_join", "yes"),
        ("reserve_window", True),  # bools used to pass as 1 second / 100%
        ("reserve_history", True),
        ("reserve_cap_fraction", True),
    ],
)
def test_invalid_config_raises_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SchedulerConfig(**{field: value})


def test_artifact_preset_differs_from_paper_defaults_where_documented():
    paper, art = SchedulerConfig.preset("paper"), SchedulerConfig.preset("artifact")
    assert paper == SchedulerConfig()
    assert art.q0 == 0.010 and art.starvation_check_interval == 1000 and art.offload_ranking == "queue_order"
    assert art.upload_only_without_offload and art.swap_overlap_factor is None
    assert art.effective_reserve_blocks == art.max_batch_size
    assert SchedulerConfig.preset("artifact", max_batch_size=64).effective_reserve_blocks == 64
    with pytest.raises(ValueError, match="unknown SchedulerConfig preset 'vendor'"):
        SchedulerConfig.preset("vendor")


def test_package_imports_no_jax_numpy_or_sibling_packages():
    code = (
        "import sys, schedulers, schedulers.registry as r\n"
        "for n in r.POLICY_NAMES: r.make_scheduler(n)\n"
        "import schedulers.bench, schedulers.priority\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'numpy', 'jserve', 'eval', 'flax', 'torch')]\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
