"""The peer's KV-cache memory: fixed-size pages shared by all sessions, and the cache view of one batched pass.

Every block of the span stores keys and values in one tensor of `num_pages` pages of `page_size` token slots, so
sessions of any length take whole pages and the pool never fragments. A session row owns a page table (the pages
of its tokens in order). A batched pass gathers each row's keys and values into a padded [rows, heads, length, dim]
tensor, right-aligned so that every row's tokens end at the newest position: the model sees them exactly as a
left-padded batch in local `transformers`, masks and sliding windows included. Padded positions read some real
slot of the row (always finite) and are masked out.
"""

import torch
from transformers.cache_utils import Cache, DynamicLayer

from swarm import huge_pages

PAGE_SIZE = 16  # tokens per page: small enough that a session wastes little of its last page

class PagedKV:
    """Keys and values of every block in pages; tensors are allocated on the first write, when shapes are known."""

    def __init__(self, num_blocks: int, num_pages: int, page_size: int):
        self.num_pages, self.page_size = num_pages, page_size
        self.keys: list[torch.Tensor | None] = [None] * num_blocks  # [num_pages * page_size, heads, dim]
        self.values: list[torch.Tensor | None] = [None] * num_blocks

    def slots(self, tables: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Flat slot index of each (row, position): `tables` [rows, pages], `positions` [rows, n] -> [rows, n]."""
        pages = tables.gather(1, positions // self.page_size)
        return pages * self.page_size + positions % self.page_size

    def write(self, block: int, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Stores `keys`/`values` [rows, heads, n, dim] at `slots` [rows, n] (on their device)."""
        if self.keys[block] is None:
            self.keys[block] = self._allocate(keys)
            self.values[block] = self._allocate(values)
        flat = slots.reshape(-1)
        self.keys[block].index_copy_(0, flat, keys.transpose(1, 2).flatten(0, 1))
        self.values[block].index_copy_(0, flat, values.transpose(1, 2).flatten(0, 1))

    def read(self, block: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values at `slots` [rows, n] (on their device) as [rows, heads, n, dim]."""
        return self.keys[block][slots].transpose(1, 2), self.values[block][slots].transpose(1, 2)

    def copy(self, source: torch.Tensor, target: torch.Tensor) -> None:
        """Copies every block's entries from slots `source` to slots `target` (beam reordering)."""
        for stored in self.keys + self.values:
            if stored is not None:
                stored[target.reshape(-1)] = stored[source.reshape(-1)]

    def _allocate(self, like: torch.Tensor) -> torch.Tensor:
        # Untouched pages cost no resident memory on the CPU until a session writes them.
        shape = (self.num_pages * self.page_size, like.shape[1], like.shape[3])
        if like.device.type == "cpu":
            return huge_pages.empty(shape, like.dtype)
        return like.new_empty(shape)


class _PassLayer(DynamicLayer):
    """Answers what the model's mask functions ask of a cache layer (how many positions precede the new tokens).

    Keys and values never pass through it: `PagedPassCache.update` handles them.
    """

    def __init__(self, past_length: int):
        super().__init__()
        self.past_length = past_length

    def get_seq_length(self) -> int:
        return self.past_length


class PagedPassCache(Cache):
    """The cache of one batched pass whose rows each add the same number of new tokens after their own past.

    `read_slots` [rows, past + new tokens] are the slots of every row's tokens so far, right-aligned (padded rows
    point at some real slot of their own, masked out by the caller); the new tokens take the last columns.
    `update` stores the new keys and values there and returns every row's keys and values so far.
    """

    def __init__(self, kv: PagedKV, read_slots: torch.Tensor, past: int):
        super().__init__(layers=[_PassLayer(past) for _ in kv.keys])
        self.kv = kv
        self.read_slots = read_slots
        self.write_slots = read_slots[:, past:]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        self.kv.write(layer_idx, self.write_slots, key_states, value_states)
        return self.kv.read(layer_idx, self.read_slots)
