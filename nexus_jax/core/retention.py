"""Which cached block no sequence holds is evicted next, from the device pool or the host tier.

Plain LRU by default. With a program-aware policy the blocks are grouped by the program that released them last
(PLAS/ATLAS applied to the cache, after Autellix): the groups of programs with no entry in the process table (ended
sessions, expired, one-call requests) go first, then those of the programs with the most attained service, and
the contexts of the programs with the least service are kept longest; LRU within a group, and between groups of
equal rank by their least recent block. An agent's context thus
stays cached while it thinks or waits for a tool, for as long as it ranks above what else the cache holds.

Ranks change only as steps land, so the order of the groups is computed once per plan that evicts (`invalidate`
marks it stale), and each eviction then costs O(1) amortized: nothing scans the blocks.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Hashable, Iterator

# The rank of a group's blocks by its owner: higher is kept longer. None: plain LRU, every block in one group.
Rank = Callable[[Hashable], tuple]


class EvictionOrder:
    """Evictable items (block ids or block keys), grouped by owner, popped lowest-ranked group first."""

    def __init__(self, rank: Rank | None = None):
        self.rank = rank
        # owner -> {item: when it was added}, least recent first
        self._groups: dict[Hashable, OrderedDict[Hashable, int]] = {}
        self._clock = 0
        self._owner_of: dict[Hashable, Hashable] = {}
        self._victims: list[Hashable] | None = None  # owners, kept longest first; None: to rank again

    def __len__(self) -> int:
        return len(self._owner_of)

    def __contains__(self, item: Hashable) -> bool:
        return item in self._owner_of

    def __iter__(self) -> Iterator[Hashable]:
        return iter(list(self._owner_of))

    def add(self, item: Hashable, owner: Hashable = None) -> None:
        """Makes `item` evictable, as the most recent of its owner's (plain LRU: owner ignored)."""
        owner = owner if self.rank is not None else None
        group = self._groups.get(owner)
        if group is None:
            group = self._groups[owner] = OrderedDict()
            self._victims = None  # a new group is ranked with the others at the next eviction
        group[item] = self._clock
        self._clock += 1
        self._owner_of[item] = owner

    def remove(self, item: Hashable) -> Hashable:
        """Takes `item` back (a sequence holds it again, or its copy moved); returns its owner."""
        owner = self._owner_of.pop(item)
        group = self._groups[owner]
        del group[item]
        if not group:
            del self._groups[owner]
        return owner

    def set_rank(self, rank: Rank | None) -> None:
        """Changes the ranking (the scheduling policy changed). Items keep their recency; under plain LRU their
        owners are not kept, so on a later change back they rank as ownerless."""
        items = list(self._owner_of.items())
        self.clear()
        self.rank = rank
        for item, owner in items:
            self.add(item, owner)

    def pop(self) -> tuple[Hashable, Hashable]:
        """Removes the next item to evict; returns it and its owner."""
        if not self._owner_of:
            raise KeyError("nothing to evict")
        if self._victims is None:  # equal ranks (the ownerless): the group holding the least recent item first
            self._victims = sorted(self._groups, key=self._key, reverse=True) if self.rank else [None]
        while self._victims[-1] not in self._groups:
            self._victims.pop()  # its last item went
        owner = self._victims[-1]
        item = next(iter(self._groups[owner]))
        self.remove(item)
        return item, owner

    def _key(self, owner: Hashable) -> tuple:
        return self.rank(owner), next(iter(self._groups[owner].values()))

    def invalidate(self) -> None:
        """The ranks changed (service accrued, a session ended): the next eviction ranks the groups again."""
        self._victims = None

    def clear(self) -> None:
        self._groups.clear()
        self._owner_of.clear()
        self._victims = None
