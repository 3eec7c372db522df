"""nexus-jax: LLM serving from JAX and Pallas. `from nexus_jax import LLM, SamplingParams` as with vLLM."""

from nexus_jax.core.config import EngineConfig
from nexus_jax.core.engine import LLMEngine
from nexus_jax.core.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from nexus_jax.core.sampling_params import SamplingParams
from nexus_jax.entrypoints.async_llm import AsyncLLM
from nexus_jax.entrypoints.llm import LLM

__all__ = ["AsyncLLM", "CompletionOutput", "EngineConfig", "LLM", "LLMEngine", "Logprob", "RequestMetrics",
           "RequestOutput", "SamplingParams"]
