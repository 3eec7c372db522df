"""Host memory for the KV blocks of sequences preempted by swapping instead of recompute.

A preempted sequence's computed blocks are copied to host blocks and its device blocks are released (a block
other sequences share keeps their references, so it stays in place for them); the sequence waits with its
progress kept. When it is admitted again it gets fresh device blocks and its host blocks are copied back, except
the head that the prefix cache still holds on the device, which it shares instead. This class only books host
blocks; the scheduler puts the (device, host) pairs in its plan and the executor moves the data.
"""

from __future__ import annotations

from typing import Hashable, Sequence


class SwapSpace:
    """Allocates host blocks to swapped-out sequences, in the order of their block tables."""

    def __init__(self, num_blocks: int):
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks <= 0:
            raise ValueError(f"a swap space needs a positive number of host blocks, got {num_blocks!r}")
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # popped from the end: low ids first
        self._held: dict[Hashable, list[int]] = {}
        self.num_swap_outs = self.num_swap_ins = 0
        self.num_blocks_out = self.num_blocks_in = 0
        self.num_fallbacks = 0  # preemptions that found the swap space full and recomputed instead

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def holds(self, seq_id: Hashable) -> bool:
        return seq_id in self._held

    def num_held(self, seq_id: Hashable) -> int:
        """Host blocks holding `seq_id`'s computed tokens (0 when it is not swapped out)."""
        return len(self._held.get(seq_id, ()))

    def swap_out(self, seq_id: Hashable, device_blocks: Sequence[int]) -> list[tuple[int, int]] | None:
        """Books a host block for each device block (the head of the sequence's table) and returns the
        (device, host) copies to make; None, booking nothing, when the space is short."""
        if seq_id in self._held:
            raise ValueError(f"sequence {seq_id!r} is already swapped out")
        if not device_blocks:
            raise ValueError(f"sequence {seq_id!r} has no computed blocks to swap out")
        if len(device_blocks) > len(self._free):
            self.num_fallbacks += 1
            return None
        host = [self._free.pop() for _ in device_blocks]
        self._held[seq_id] = host
        self.num_swap_outs += 1
        self.num_blocks_out += len(host)
        return list(zip(device_blocks, host))

    def swap_in(self, seq_id: Hashable, device_blocks: Sequence[int], skip: int = 0) -> list[tuple[int, int]]:
        """Releases the host blocks of `seq_id` and returns the (host, device) copies that restore it: its host
        block `skip + i` goes to `device_blocks[i]`; the first `skip` (still on the device) are not copied."""
        host = self._held.get(seq_id)
        if host is None:
            raise KeyError(f"sequence {seq_id!r} is not swapped out")
        if not 0 <= skip <= len(host) or len(device_blocks) != len(host) - skip:
            raise ValueError(f"{len(device_blocks)} device blocks after skipping {skip} cannot restore the "
                             f"{len(host)} host blocks of {seq_id!r}")
        self.release(seq_id)
        self.num_swap_ins += 1
        self.num_blocks_in += len(device_blocks)
        return list(zip(host[skip:], device_blocks))

    def release(self, seq_id: Hashable) -> None:
        """Returns the host blocks of `seq_id` (finished, aborted or swapped in); nothing if it holds none."""
        # Released in reverse so that the next swap-out pops them in the same order.
        self._free.extend(reversed(self._held.pop(seq_id, ())))

    def stats(self) -> dict:
        return {"swap_free_blocks": len(self._free), "swap_total_blocks": self.num_blocks,
                "num_swap_outs": self.num_swap_outs, "num_swap_ins": self.num_swap_ins,
                "num_swapped_out_blocks": self.num_blocks_out, "num_swapped_in_blocks": self.num_blocks_in,
                "num_swap_fallbacks": self.num_fallbacks}
