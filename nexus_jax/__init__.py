"""nexus-jax: LLM serving from JAX and Pallas. `from nexus_jax import LLM, SamplingParams` as with vLLM."""

from nexus_jax.async_llm import AsyncLLM
from nexus_jax.config import EngineConfig
from nexus_jax.engine import LLMEngine
from nexus_jax.llm import LLM
from nexus_jax.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from nexus_jax.sampling_params import SamplingParams

__all__ = ["AsyncLLM", "CompletionOutput", "EngineConfig", "LLM", "LLMEngine", "Logprob", "RequestMetrics",
           "RequestOutput", "SamplingParams"]
