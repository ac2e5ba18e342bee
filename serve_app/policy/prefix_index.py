"""Which replica was lately sent which prompt prefix: an approximate picture of the replicas' prefix caches.

A prompt is cut into blocks of `BLOCK_CHARS` characters, and block i's hash covers blocks 0..i (a chain), so a
hash names a whole prefix, as vLLM's block hashes do for tokens. The Router hashes (characters, not tokens:
it never tokenises); Admission keeps, per block hash, the replicas it sent that prefix to, in one LRU of
bounded size. A replica's match for a new prompt is the number of its leading blocks that replica holds.

It is approximate, like SGLang's and llm-d's approximate scorers: the index assumes an engine caches what it
was sent and forgets it in the order it was last used, while the engine's own eviction depends on its
memory. Routing uses the match only as an expected saving (`token_load.Work.cached_tokens`), weighed
against load, so a wrong guess costs one request a cold prefill. Pure: no Ray, no HTTP, no asyncio.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable, Sequence

# About 64 tokens for English text: coarse enough to hash cheaply, fine enough for system prompts and turns.
BLOCK_CHARS = 256
# Blocks hashed per prompt: 64k characters (about 16k tokens); a longer prompt matches on that much.
MAX_BLOCKS = 256


def block_hashes(text: str, namespace: str = "", block_chars: int = BLOCK_CHARS) -> tuple[int, ...]:
    """Chained hashes of the full leading blocks of `text` (a partial last block is not cached by an engine
    either). `namespace` (the model) starts the chain, so two models never share an entry. Stable across
    processes (blake2b, not Python's salted `hash`), so every Router names a prefix alike."""
    hashes = []
    previous = hashlib.blake2b(namespace.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    full = min(len(text) // block_chars, MAX_BLOCKS)
    for i in range(full):
        block = text[i * block_chars : (i + 1) * block_chars].encode("utf-8", "surrogatepass")
        previous = hashlib.blake2b(previous + block, digest_size=8).digest()
        hashes.append(int.from_bytes(previous, "little"))
    return tuple(hashes)


class PrefixIndex:
    """Block hash -> the replicas that were sent that prefix, least recently used first. `max_entries` bounds
    the (block, replica) pairs held: the memory is bounded however many prompts go by."""

    def __init__(self, max_entries: int = 200_000) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self._holders: OrderedDict[int, set[str]] = OrderedDict()
        self._entries = 0

    def __len__(self) -> int:
        """(block, replica) pairs held."""
        return self._entries

    def match(self, blocks: Sequence[int], replicas: Iterable[str]) -> dict[str, int]:
        """For each of `replicas`: how many leading blocks of the prompt it holds (0 when none)."""
        matched = dict.fromkeys(replicas, 0)
        alive = set(matched)
        for depth, block in enumerate(blocks):
            alive &= self._holders.get(block, set())
            if not alive:
                break
            for replica in alive:
                matched[replica] = depth + 1
        return matched

    def record(self, blocks: Sequence[int], replica: str) -> None:
        """The prompt was sent to `replica`: it now holds every one of its blocks, freshest of all. The leading
        blocks are made the freshest, so eviction takes a prefix's tail first, as vLLM's does."""
        for block in reversed(blocks):
            holders = self._holders.get(block)
            if holders is None:
                holders = self._holders[block] = set()
            else:
                self._holders.move_to_end(block)
            if replica not in holders:
                holders.add(replica)
                self._entries += 1
        while self._entries > self.max_entries:
            _, holders = self._holders.popitem(last=False)
            self._entries -= len(holders)

    def forget(self, replica: str) -> None:
        """The replica left (or restarted, with an empty cache): nothing is expected from it any more."""
        for block in list(self._holders):
            holders = self._holders[block]
            if replica in holders:
                holders.discard(replica)
                self._entries -= 1
                if not holders:
                    del self._holders[block]
