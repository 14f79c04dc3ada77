"""``CompileWatch``: counts XLA compilations in the process (the engine's "nothing compiles after warm-up"
check, and tests').

JAX reports the backend-compile event around its persistent-cache lookup too, so an executable loaded from
the cache (``--compile-cache``, ``JAX_COMPILATION_CACHE_DIR``) counts like one compiled: a shape that
escaped the buckets is caught whether or not an earlier process compiled it
(tests/jserve/test_compile_cache.py holds JAX to this)."""

from __future__ import annotations

import jax

__all__ = ["CompileWatch"]


class CompileWatch:
    """Counts XLA backend compilations in this process while active (a context manager)."""

    _EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self) -> None:
        self.count = 0
        self._active = False

    def _listener(self, event: str, duration: float, **_) -> None:
        if self._active and event == self._EVENT:
            self.count += 1

    def __enter__(self) -> "CompileWatch":
        jax.monitoring.register_event_duration_secs_listener(self._listener)
        self._active = True
        return self

    def __exit__(self, *exc) -> None:
        self._active = False
        try:
            jax.monitoring.unregister_event_duration_listener(self._listener)
        except Exception:  # older jax without unregister: the inactive listener stays harmless
            pass
