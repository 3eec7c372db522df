"""What starting an engine takes of the model in either mode: its description (config and tokenizer), the check
of max_model_len against its context, and the context length the engine then serves.

The aggregated engine loads the weights here too; the disaggregated engine loads only the description (its workers
load the weights) and learns the KV pool's size from its holder.
"""

from __future__ import annotations

import dataclasses

from nexus_jax.core.config import EngineConfig
from nexus_jax.core.tokenizer import Tokenizer, eos_token_ids, load_tokenizer
from runner.model import loader
from runner.model.loader import LoadedModel


@dataclasses.dataclass(frozen=True)
class ModelFacts:
    """What LLMEngine's constructor takes of the model besides the executor."""
    tokenizer: Tokenizer | None
    max_model_len: int       # the longest sequence served: the model's context, max_model_len and the pool's bound
    vocab_size: int
    eos_token_ids: tuple[int, ...]


def load_checked(config: EngineConfig, *, with_params: bool) -> LoadedModel:
    """The model (with_params=False: its config and tokenizer only), once max_model_len fits its context."""
    # Looked up at call time, so that a wrapper installed on runner.model.loader.load_model sees every load.
    loaded = loader.load_model(config.model, config.dtype, cache_dir=config.params_cache_dir, seed=config.seed,
                               with_params=with_params)
    context = loaded.config.max_position_embeddings
    if config.max_model_len is not None and config.max_model_len > context:
        raise ValueError(f"max_model_len {config.max_model_len} exceeds the model's context ({context})")
    return loaded


def model_facts(config: EngineConfig, loaded: LoadedModel, num_blocks: int) -> ModelFacts:
    """Loads the tokenizer and gathers the rest from the model and a KV pool of num_blocks."""
    # max_model_len (default: the model's context), bounded by what the pool holds.
    max_len = min(config.max_model_len or loaded.config.max_position_embeddings, num_blocks * config.block_size)
    tokenizer = load_tokenizer(loaded)
    return ModelFacts(tokenizer, max_len, loaded.config.vocab_size, eos_token_ids(loaded, tokenizer))
