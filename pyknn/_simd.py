"""Instruction-set level and thread count of the compiled kernels."""
import os

from . import _core

_MAX_THREADS = 1024

__all__ = ["simd_level", "set_simd_level", "available_simd_levels", "num_threads", "set_num_threads"]


def simd_level() -> str:
    """Return the instruction-set level the kernels run at now: "scalar", "avx2" or "avx512".

    "scalar" is the portable build of the kernels (the platform's baseline instructions: SSE2 on
    x86-64, NEON on aarch64). The level is chosen once at import from cpuid/xgetbv, lowered by
    the environment variable ``PYKNN_SIMD`` or by :func:`set_simd_level`.
    """
    return _core.simd_level()


def available_simd_levels() -> list:
    """Return the levels this CPU and OS support, lowest first (always starts with "scalar")."""
    return list(_core.available_simd_levels())


def set_simd_level(name: str) -> None:
    """Run the kernels at the level ``name`` from now on, in this process.

    Parameters
    ----------
    name : "scalar" | "avx2" | "avx512" | "auto"
        "auto" restores the best level of this CPU. Levels can be lowered, never raised above what
        the CPU supports: asking for one it lacks raises ValueError naming the available levels.
    """
    if not isinstance(name, str):
        raise TypeError(f"level name must be a str, got {type(name).__name__}")
    _core.set_simd_level(name.strip().lower())


def num_threads() -> int:
    """Return the number of threads searches and builds use (default: the machine's cores)."""
    return _core.num_threads()


def set_num_threads(n: int) -> None:
    """Set the number of threads for searches and builds; ``n <= 0`` restores the default."""
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"n must be an int, got {type(n).__name__}")
    if n > _MAX_THREADS:
        raise ValueError(f"n must be at most {_MAX_THREADS}, got {n}")
    _core.set_num_threads(max(n, 0))


_env = os.environ.get("PYKNN_SIMD", "").strip()
if _env:
    try:
        set_simd_level(_env)
    except ValueError as e:
        raise ImportError(f"PYKNN_SIMD={_env!r}: {e}") from None
_env = os.environ.get("PYKNN_NUM_THREADS", "").strip()
if _env:
    try:
        set_num_threads(int(_env))
    except ValueError as e:
        raise ImportError(f"PYKNN_NUM_THREADS={_env!r}: expected a thread count ({e})") from None
del _env
