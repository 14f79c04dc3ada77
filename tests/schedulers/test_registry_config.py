"""The registry, the configuration's validation and presets, and the package's import purity."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sched_harness import run_workload

from schedulers import (POLICY_NAMES, Request, Scheduler, SchedulerConfig, available_policies, make_scheduler,
                        register_policy)
from schedulers.fixed_priority import FixedPriorityScheduler
from schedulers.priority import PriorityScheduler

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


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_queues=2000), r"SchedulerConfig\.num_queues must be an int in \[1, 1024\], got 2000"),
        (dict(num_queues=10**5000), r"num_queues must be an int in \[1, 1024\], got an int of about 10\*\*5000"),
        (dict(num_queues=1024, quantum_ratio=4.0), r"SchedulerConfig\.num_queues=1024 with quantum_ratio=4\.0: the last "
                                                   r"level's quantum, .* overflows a float"),
        (dict(num_queues=600, quantum_ratio=2.0, q0=1e200), r"num_queues=600 with quantum_ratio=2\.0 and q0=1e\+200"),
        (dict(q0=10**400), r"SchedulerConfig\.q0 must be finite \(a float\), got an int of about 10\*\*400"),
        (dict(quantum_ratio=10**400), r"SchedulerConfig\.quantum_ratio must be finite"),
        (dict(num_device_blocks=300, reserve_blocks=5000), r"SchedulerConfig\.reserve_blocks must be an int in "
                                                           r"\[0, 300\] \(at most the usable device blocks.*got 5000"),
        (dict(num_device_blocks=300, reserved_device_ids=(0, 1), reserve_blocks=299), r"reserve_blocks .*\[0, 298\]"),
        (dict(num_device_blocks=300, upload_margin_blocks=301), r"SchedulerConfig\.upload_margin_blocks must be an "
                                                                r"int in \[0, 300\]"),
    ],
)
def test_values_that_used_to_fail_late_or_silently_name_the_field(kwargs, match):
    """num_queues=2000 or a huge q0/quantum_ratio passed the config and broke make_scheduler with a bare
    OverflowError; a reserve or upload margin above the device pool was accepted (the reserve can never be met,
    so every idle job was offloaded every step)."""
    with pytest.raises(ValueError, match=match):
        SchedulerConfig(**kwargs)


def test_limits_themselves_are_accepted():
    SchedulerConfig(num_queues=1024, quantum_ratio=1.0)
    SchedulerConfig(num_queues=1000, quantum_ratio=2.0, q0=1e-300)
    SchedulerConfig(num_device_blocks=300, reserve_blocks=300, upload_margin_blocks=300)
    make_scheduler("fastserve", SchedulerConfig(num_queues=1024, quantum_ratio=1.5))


def test_a_cost_model_q0_whose_quanta_overflow_names_the_fields():
    from schedulers.cost import FittedCostModel

    slow = FittedCostModel(p0=0.0, p1=0.001, p2=0.0, d0=1e300, d1=0.0, d2=0.0, block_bytes=1, swap_bandwidth=1.0)
    with pytest.raises(ValueError, match=r"fastserve: the last level's quantum, q0 \* quantum_ratio \*\* \(num_queues "
                                         r"- 1\) = 1e\+300 \* 2\.0 \*\* 31, overflows"):
        make_scheduler("fastserve", SchedulerConfig(), slow)


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


class LongestPromptFirst(PriorityScheduler):
    """A researcher's policy: the longest prompt first (KV management is PriorityScheduler's)."""

    def _initial_key(self, r, now):
        return (-r.prompt_len, self._next_seq())


def test_a_registered_policy_is_built_by_make_scheduler_and_runs(policy_registry):
    register_policy("longest-first", LongestPromptFirst)
    assert available_policies() == [*POLICY_NAMES, "longest-first"]
    s = make_scheduler("longest-first", SchedulerConfig(block_size=4, num_device_blocks=40, num_host_blocks=40,
                                                        max_batch_size=1, max_model_len=64))
    assert type(s) is LongestPromptFirst and s.name == "longest-first"
    reqs = [Request(i, p, 4) for i, p in enumerate((5, 30, 12, 20))]
    res = run_workload(s, [(0.0, r) for r in reqs])  # the strict harness: every rule, every step
    assert sorted(res.finished) == [0, 1, 2, 3]
    assert [r.request_id for r in sorted(reqs, key=lambda r: r.first_token_time)] == [1, 3, 2, 0]
    with pytest.raises(ValueError, match="unknown scheduler policy 'fifo'.*longest-first"):
        make_scheduler("fifo")


def test_register_policy_forces_its_overrides(policy_registry):
    from schedulers.fastserve import FastServeScheduler

    register_policy("fs-aging", FastServeScheduler, overrides={"promotion": "one_level"})
    assert make_scheduler("fs-aging", SchedulerConfig()).config.promotion == "one_level"
    with pytest.raises(ValueError, match=r"overrides names unknown SchedulerConfig fields \['promoshun'\]"):
        register_policy("fs-typo", FastServeScheduler, overrides={"promoshun": "one_level"})


def test_register_policy_refuses_a_taken_name_unless_replace(policy_registry):
    with pytest.raises(ValueError, match=r"the name 'fcfs' is taken \(by schedulers\.fcfs\.FCFSScheduler\); pass "
                                         r"replace=True"):
        register_policy("fcfs", LongestPromptFirst)
    register_policy("mine", LongestPromptFirst)
    with pytest.raises(ValueError, match=r"'mine' is taken \(by .*LongestPromptFirst\)"):
        register_policy("mine", LongestPromptFirst)
    register_policy("mine", FixedPriorityScheduler, replace=True)
    assert type(make_scheduler("mine")) is FixedPriorityScheduler
    register_policy("fcfs", LongestPromptFirst, replace=True)
    assert type(make_scheduler("fcfs")) is LongestPromptFirst


@pytest.mark.parametrize("cls", [object, Scheduler, LongestPromptFirst(SchedulerConfig()), "schedulers.fcfs", None])
def test_register_policy_refuses_what_is_not_a_policybase_subclass(policy_registry, cls):
    with pytest.raises(TypeError, match=r"register_policy: 'mine': cls must be a subclass of schedulers\.PolicyBase"):
        register_policy("mine", cls)
    assert "mine" not in available_policies()


@pytest.mark.parametrize("name", ["", "  ", 3, None])
def test_register_policy_refuses_a_bad_name(policy_registry, name):
    with pytest.raises(ValueError, match="register_policy: name must be a non-empty string"):
        register_policy(name, LongestPromptFirst)
