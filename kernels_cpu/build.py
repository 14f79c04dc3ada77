"""Compile ``native.cc`` into a shared library on first use, load it and register its XLA FFI targets.

The library is built for the machine it runs on (``g++ -O3 -march=native``) into
``$JSERVE_CACHE_DIR/kernels_cpu`` (default ``~/.cache/jserve/kernels_cpu``), under a name that hashes the
source, the compiler command, the jaxlib version and the CPU's model and feature flags, so a changed
source, flag, jaxlib or CPU (a cache directory shared between machines) builds afresh, and concurrent
processes never load a half-written file (each writes a private temporary file and renames it).

``load()`` returns ``True`` once the targets are registered, or ``False`` with the reason kept in
``unavailable_reason()`` (and logged once as a warning, unless ``JSERVE_CPU_KERNELS=0`` turned the kernels
off) when there is no C++ compiler, the CPU lacks AVX-512F, or the compile fails; callers then use XLA's own
ops. It never raises. ``CXX`` may carry arguments (``CXX="ccache g++"``). A cached library that does not load
(a compiler that exited 0 without writing one) is deleted and built once more.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import jax
import jaxlib

__all__ = ["load", "unavailable_reason", "library_path", "TARGETS"]

SOURCE = Path(__file__).with_name("native.cc")
TARGETS = ("jserve_matmul_nt", "jserve_paged_decode_attention")
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno", "-w")

_lock = threading.Lock()
_state: dict[str, object] = {}


def _cache_dir() -> Path:
    return Path(os.environ.get("JSERVE_CACHE_DIR") or Path.home() / ".cache" / "jserve") / "kernels_cpu"


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


def _command(cxx: str, out: Path) -> list[str]:
    return [*shlex.split(cxx), *_FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(out)]


def _cpu_identity() -> str:
    """The CPU's model name and feature flags (what ``-march=native`` compiles for), as Linux reports them."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine() + platform.processor()
    wanted = ("model name", "flags", "features", "cpu model")
    seen = [ln for ln in lines if ln.split(":")[0].strip().lower() in wanted]
    return platform.machine() + "\n" + "\n".join(dict.fromkeys(seen))


def library_path(cxx: str) -> Path:
    """Where the library built by ``cxx`` for this source, these flags, this jaxlib and this CPU lives."""
    key = hashlib.blake2b(digest_size=8)
    key.update(SOURCE.read_bytes())
    key.update(" ".join((cxx, *_FLAGS, jaxlib.__version__)).encode())
    key.update(_cpu_identity().encode())
    return _cache_dir() / f"native-{key.hexdigest()}.so"


def _build(cxx: str) -> Path:
    target = library_path(cxx)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        proc = subprocess.run(_command(cxx, Path(tmp)), capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            errors = [ln.strip() for ln in proc.stderr.splitlines() if "error" in ln.lower()]
            raise RuntimeError(f"{cxx} failed: {'; '.join(errors[:3]) or proc.stderr.strip()[-500:]}")
        if os.path.getsize(tmp) == 0:
            raise RuntimeError(f"{cxx} exited 0 but wrote no library")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _load() -> str | None:
    """Build, load and register; the reason they are unavailable, or None."""
    if os.environ.get("JSERVE_CPU_KERNELS", "1").strip().lower() in ("0", "false", "off", "no"):
        return "turned off by JSERVE_CPU_KERNELS"
    cxx = _compiler()
    if cxx is None:
        return "no C++ compiler found (set CXX, or install g++)"
    try:
        path = _build(cxx)
        try:
            lib = ctypes.cdll.LoadLibrary(str(path))
        except OSError:  # a broken file in the cache (every later process would fail on it): build it again
            path.unlink(missing_ok=True)
            lib = ctypes.cdll.LoadLibrary(str(_build(cxx)))
        for name in TARGETS:
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)), platform="cpu")
    except Exception as err:  # a failed build or load leaves XLA's ops in place
        return f"could not build or load {SOURCE.name}: {err}"
    _state["library"] = lib  # keep the library loaded for the life of the process
    return None


def load() -> bool:
    """Make the native kernels callable (once per process); ``False`` if they are unavailable here."""
    with _lock:
        if "reason" not in _state:
            _state["reason"] = reason = _load()
            if reason is not None and not reason.startswith("turned off"):
                logging.getLogger("jserve").warning("native CPU kernels unavailable, XLA's ops run instead: %s", reason)
        return _state["reason"] is None


def unavailable_reason() -> str | None:
    """Why ``load()`` returned ``False`` (``None`` if it succeeded or has not run)."""
    return _state.get("reason")  # type: ignore[return-value]
