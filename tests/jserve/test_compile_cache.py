"""The persistent compilation cache: ``CompileWatch`` counts an executable loaded from the cache like one
compiled (so "nothing compiles after warm-up" holds with the cache on), and
``enable_compile_cache`` / ``--compile-cache`` turn it on, even after an earlier compile, or name a bad
folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys

SCRIPT = """
import json, sys, jax, jax.numpy as jnp
from jserve.engine import CompileWatch
if len(sys.argv) > 1:  # a compile with no cache first, then the cache on (the --compile-cache path)
    from jserve.compile_cache import enable_compile_cache
    jax.jit(lambda x: x + 1.0).lower(jax.ShapeDtypeStruct((3,), jnp.float32)).compile()
    enable_compile_cache(sys.argv[1])
hits = []
jax.monitoring.register_event_listener(lambda e, **_: hits.append(e) if e.endswith("/cache_hits") else None)
with CompileWatch() as w:
    jax.jit(lambda x: jnp.sin(x) * 3.0 + 1.0).lower(jax.ShapeDtypeStruct((7, 5), jnp.float32)).compile()
print(json.dumps({"count": w.count, "cache_loads": len(hits)}))
"""


def _run(cache_dir, enable_late: bool = False) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    args = [str(cache_dir)] if enable_late else []
    if not enable_late:
        env["JAX_COMPILATION_CACHE_DIR"] = str(cache_dir)
    out = subprocess.run([sys.executable, "-c", SCRIPT, *args], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_cache_load_counts_as_a_compilation(tmp_path):
    first = _run(tmp_path)  # empty cache: the compiler builds it and writes it
    assert first == {"count": 1, "cache_loads": 0}
    assert any(tmp_path.iterdir())
    second = _run(tmp_path)  # a new process: the same executable comes from disk
    assert second == {"count": 1, "cache_loads": 1}


def test_the_watch_counts_only_while_active():
    import jax
    import jax.numpy as jnp

    from jserve.engine import CompileWatch

    watch = CompileWatch()
    with watch:
        jax.jit(lambda x: x * 5.0 - 2.0).lower(jax.ShapeDtypeStruct((3, 11), jnp.float32)).compile()
    jax.jit(lambda x: x * 7.0 - 2.0).lower(jax.ShapeDtypeStruct((3, 13), jnp.float32)).compile()
    assert watch.count == 1


def test_enable_compile_cache_takes_effect_after_an_earlier_compile(tmp_path):
    cache = tmp_path / "made" / "here"  # created on demand
    assert _run(cache, enable_late=True) == {"count": 1, "cache_loads": 0}
    assert any(cache.iterdir())
    assert _run(cache, enable_late=True) == {"count": 1, "cache_loads": 1}


def test_a_compile_cache_that_is_not_a_folder_is_named(tmp_path, capsys):
    import pytest

    from jserve.cli import main

    not_a_folder = tmp_path / "a-file"
    not_a_folder.write_text("x")
    with pytest.raises(SystemExit) as e:
        main(["generate", "hi", "--compile-cache", str(not_a_folder)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--compile-cache" in err and "not a writable folder" in err and "a-file" in err
