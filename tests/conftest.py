"""Suite-wide test settings.

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
