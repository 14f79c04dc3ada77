"""Every jserve module imports on its own in a fresh interpreter (no import cycles between
jserve.models and jserve.weights)."""

from __future__ import annotations

import subprocess
import sys

import pytest

MODULES = ["jserve.weights.namemap", "jserve.weights.load", "jserve.tokenizer", "jserve.models.llama"]


@pytest.mark.parametrize("module", MODULES)
def test_module_imports_first(module):
    r = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
