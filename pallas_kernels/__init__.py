"""Paged-attention and grouped-GEMM (mixture-of-experts) kernels for nexus-jax: Pallas (Triton lowering) on CUDA
GPUs, pure jnp elsewhere.

Every public function takes `impl`: None (auto: "pallas" on a capable CUDA GPU, else "xla" with one logged
warning), "pallas", "interpret" (the Pallas kernels in interpret mode, for CPU tests) or "xla".
"""

from pallas_kernels.backend import resolve_impl
from pallas_kernels.decode_attention import paged_decode_attention
from pallas_kernels.grouped_matmul import grouped_matmul
from pallas_kernels.kv_write import write_kv
from pallas_kernels.prefill_attention import paged_prefill_attention
from pallas_kernels.reference import (
                                      paged_decode_attention_reference,
                                      paged_prefill_attention_reference,
                                      write_kv_reference,
)

__all__ = ["grouped_matmul", "paged_decode_attention", "paged_decode_attention_reference", "paged_prefill_attention",
           "paged_prefill_attention_reference", "resolve_impl", "write_kv", "write_kv_reference"]
