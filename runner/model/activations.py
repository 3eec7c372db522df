"""The MLP activations a checkpoint's `hidden_act` may name, spelled as transformers' ACT2FN spells them."""

from __future__ import annotations

import functools
from typing import Callable

import jax

# transformers' "gelu" is the exact (erf) GELU; "gelu_new", "gelu_fast" and "gelu_pytorch_tanh" are all the tanh
# approximation (the same formula, written three ways there). Names missing here are refused by ModelConfig.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_fast": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
}
