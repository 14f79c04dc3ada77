"""Turn on JAX's persistent compilation cache for this process (the ``--compile-cache DIR`` option of the
``jserve`` commands).

The engine compiles every step shape at start-up. With the cache on, each executable is written to ``DIR``
once and later processes with the same model, shapes, JAX version and device load it instead of compiling:
``jserve generate`` with SmolLM2 on two CPU cores starts in about half the time on the second run
(docs/engine.md). Library users get the same with ``JAX_COMPILATION_CACHE_DIR=DIR`` or
``jax.config.update("jax_compilation_cache_dir", DIR)`` before the first compile.

The engine's "nothing compiles after warm-up" count includes executables loaded from the cache
(``jserve.engine.CompileWatch``). The cache is trusted code: keep ``DIR`` writable by you alone.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["enable_compile_cache"]


def enable_compile_cache(path: str | Path) -> Path:
    """Point JAX's persistent compilation cache at ``path`` (created if missing) for the rest of this
    process; returns the resolved folder. Raises ``OSError`` when the folder cannot be created or written."""
    folder = Path(path).expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / ".jserve-write-probe"
    probe.write_bytes(b"")  # fails here, with the folder named, rather than silently at the first compile
    probe.unlink()
    from jax.experimental.compilation_cache import compilation_cache

    compilation_cache.set_cache_dir(str(folder))
    compilation_cache.reset_cache()  # a compile before this call may have settled "no cache" for the process
    return folder
