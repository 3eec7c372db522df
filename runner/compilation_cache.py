"""JAX's persistent compilation cache, set in this process or handed to a worker process through its environment.

Both forms name the same two settings: the directory, and a zero minimum compile time (every program is cached,
so that a process after the first loads its step programs instead of compiling them).
"""

from __future__ import annotations

from typing import Any


def _settings(path: str) -> dict[str, Any]:
    return {"jax_compilation_cache_dir": path, "jax_persistent_cache_min_compile_time_secs": 0.0}


def use_compilation_cache(path: str) -> None:
    """Process-wide, and read when JAX first compiles: compilations before this call may not use the cache."""
    import jax

    for name, value in _settings(path).items():
        jax.config.update(name, value)


def compilation_cache_env(path: str) -> dict[str, str]:
    """The environment variables that set the cache in a new process (JAX reads them at import)."""
    return {name.upper(): f"{value:g}" if isinstance(value, float) else value
            for name, value in _settings(path).items()}
