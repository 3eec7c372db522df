"""Chooses between the Pallas kernels and the pure-jnp (XLA) path."""

from __future__ import annotations

import functools
import logging

import jax

IMPLS = ("pallas", "interpret", "xla")
# The Triton lowering needs bf16 tensor cores and cp.async: Ampere (sm_80) or newer.
_MIN_COMPUTE_CAPABILITY = 8.0

log = logging.getLogger(__name__)


def resolve_impl(impl: str | None, head_dim: int | None = None) -> str:
    """Returns the implementation to run: `impl` itself, or for None the best one this process can run.

    None picks "pallas" on a CUDA GPU of compute capability >= 8.0 whose jax ships the Pallas Triton lowering
    (and, when `head_dim` is given, only if the kernels support it), else "xla", and then logs one warning per
    process and reason saying why.
    """
    if impl is None:
        impl = _auto_impl()
        if impl == "pallas" and head_dim is not None and not pallas_supports_head_dim(head_dim):
            return _fallback(f"head_dim {head_dim} is not a power of two >= 16")
        return impl
    if impl not in IMPLS:
        raise ValueError(f"unknown kernel impl {impl!r}; expected None or one of {', '.join(IMPLS)}")
    return impl


def pallas_supports_head_dim(head_dim: int) -> bool:
    # Triton tensors have power-of-two sizes and its tensor-core dot needs K >= 16.
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0


@functools.cache
def _auto_impl() -> str:
    reason = _pallas_unavailable_reason()
    return "pallas" if reason is None else _fallback(reason)


@functools.cache
def _fallback(reason: str) -> str:
    log.warning("nexus-jax attention kernels: using the XLA (pure jnp) path because %s", reason)
    return "xla"


def _pallas_unavailable_reason() -> str | None:
    device = jax.devices()[0]
    if device.platform != "gpu":
        return f"the default device is {device.platform}, not a CUDA GPU"
    if "cuda" not in device.client.platform_version.lower():
        return f"the GPU runtime is {device.client.platform_version!r}, not CUDA"
    capability = getattr(device, "compute_capability", None)
    if capability is None or float(capability) < _MIN_COMPUTE_CAPABILITY:
        return f"GPU compute capability {capability} is below {_MIN_COMPUTE_CAPABILITY}"
    try:
        from jax.experimental.pallas import triton  # noqa: F401
    except ImportError as e:
        return f"jax.experimental.pallas.triton does not import ({e})"
    return None
