"""cache_salt (vLLM's, CVE-2025-46570): requests share cached prefix blocks only with requests of the same salt, in
the block manager, through the engine and (tests/server/test_server_clients.py) over gRPC."""

import random

import pytest

from nexus_jax import LLM, SamplingParams
from nexus_jax.core.block_manager import BlockManager
from nexus_jax.core.sampling_params import MAX_CACHE_SALT_CHARS
from nexus_jax.testing.engines import make_engine


def test_block_keys_chain_from_the_salt():
    rng = random.Random(7)
    bm = BlockManager(64, 4)
    prompt = [rng.randrange(1000) for _ in range(17)]  # 4 full blocks can match
    table = bm.allocate("a", len(prompt), salt="tenant-a")
    bm.commit("a", prompt, len(prompt))
    assert bm.match_prefix(prompt, "tenant-a") == table[:4]
    assert bm.match_prefix(prompt) == [] and bm.match_prefix(prompt, "tenant-b") == []
    # The salted chain is whole: a second salted sequence built on the match commits further blocks under it.
    longer = prompt + [rng.randrange(1000) for _ in range(8)]
    head = bm.match_prefix(longer, "tenant-a")
    second = bm.allocate("b", len(longer), head, salt="tenant-a")
    bm.commit("b", longer, len(longer))
    assert bm.match_prefix(longer, "tenant-a") == second[:6] and bm.match_prefix(longer) == []
    with pytest.raises(ValueError, match="do not chain"):
        bm.allocate("c", len(prompt), head)  # salted blocks are no head of an unsalted sequence
    bm.free("a")
    bm.free("b")
    assert bm.match_prefix(prompt, "tenant-a") == table[:4]  # still cached for its own salt
    fresh = [1000 + i for i in range(9)]
    forked = bm.allocate("p", 8, salt="tenant-a")
    bm.fork("p", "q", 8)  # before the parent committed anything: the child's first keys come from the salt
    bm.commit("q", fresh, 8)
    assert bm.match_prefix(fresh, "tenant-a") == forked[:2] and bm.match_prefix(fresh) == []


def test_no_prefix_hit_across_salts_and_hits_within_one():
    engine = make_engine()
    llm = LLM.from_engine(engine)
    prompt = {"prompt_token_ids": [random.randrange(500) for _ in range(40)]}

    def hit_tokens(salt):
        before = engine.block_manager.stats()["prefix_hit_tokens"]
        llm.generate([prompt], SamplingParams(max_tokens=2, cache_salt=salt), use_tqdm=False)
        return engine.block_manager.stats()["prefix_hit_tokens"] - before

    assert hit_tokens("alice") == 0
    assert hit_tokens("bob") == 0 and hit_tokens(None) == 0  # another salt, and none, miss alice's blocks
    assert hit_tokens("alice") == 36 and hit_tokens("bob") == 36 and hit_tokens(None) == 36  # 9 full blocks each


@pytest.mark.parametrize("salt", ["", 7, b"x", "s" * (MAX_CACHE_SALT_CHARS + 1)])
def test_a_bad_salt_is_a_value_error(salt):
    with pytest.raises(ValueError, match="cache_salt"):
        SamplingParams(cache_salt=salt)
