"""The state of one inference session on this peer: its page table, attention mask and position."""

import asyncio
from dataclasses import dataclass, field

import torch

from peer.adapters import HostedAdapter
from peer.kv_pages import PagedKV


class InferenceSessionState:
    """Lives as long as the session's stream; `prepare` and the batched passes run on the compute thread."""

    def __init__(
        self,
        session_id: str,
        span_start: int,
        start: int,
        end: int,
        batch_size: int,
        max_length: int,
        pages: list[int],
        lora: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
        lora_scaling: float = 1.0,
        adapter: HostedAdapter | None = None,
        deep_prompts: torch.Tensor | None = None,
    ):
        self.session_id = session_id
        self.lora, self.lora_scaling = lora or {}, lora_scaling
        self.adapter = adapter
        self.deep_prompts = deep_prompts  # [blocks, prefix, hidden], added at cache positions < prefix
        self.span_start = span_start
        self.end_block = end  # the first block after the session's: where its pushes may go
        self.blocks = slice(start - span_start, end - span_start)
        self.batch_size, self.max_length = batch_size, max_length
        self.position = 0
        self.closed = False  # set by the handler; queued steps of a closed session are dropped
        self.codec = ""  # wire compression of its answers and pushes (chosen by the client)
        self.last_step: asyncio.Future | None = None  # the step in the compute runtime's hands, if any
        self.last_step_id = 0  # of the last step run: steps come from the client's stream and by push
        self.turn = asyncio.Lock()  # one step at a time, whichever way it came
        self.answers = None  # the session's gRPC stream context: every step's answer goes out on it
        self.idle_deadline: asyncio.Timeout | None = None  # while waiting for the client's next message
        self.page_table = torch.tensor(pages, dtype=torch.int64).view(batch_size, -1)  # a row's pages, in order
        self._slot_table: torch.Tensor | None = None
        self.mask = torch.zeros(batch_size, max_length, dtype=torch.bool)

    def slot_table(self, kv: PagedKV) -> torch.Tensor:
        """[batch, max_length]: the KV slot of every position of every row (made once: a pass then slices it)."""
        if self._slot_table is None:
            positions = torch.arange(self.max_length).expand(self.batch_size, -1)
            self._slot_table = kv.slots(self.page_table, positions)
        return self._slot_table

    def deep_prompts_from(self, position: int, num_tokens: int) -> torch.Tensor | None:
        """The deep prompts of the `num_tokens` positions from `position` that have one, for every row."""
        if self.deep_prompts is None or position >= self.deep_prompts.shape[1]:
            return None
        prompts = self.deep_prompts[:, position : position + num_tokens]
        return prompts.unsqueeze(1).expand(-1, self.batch_size, -1, -1)

    def prepare(self, kv: PagedKV, beam_reorder: torch.Tensor | None, start_position: int | None) -> None:
        """Rolls back and/or reorders the rows before a step's new tokens are run."""
        if start_position is not None:
            self.position = start_position
        if beam_reorder is not None and self.position > 0:
            slots = self.slot_table(kv)[:, : self.position]
            kv.copy(slots[beam_reorder], slots)
            self.mask[:, : self.position] = self.mask[beam_reorder, : self.position]


@dataclass
class StepWork:
    """One session's step as queued for the compute thread; prefill may run in several chunks."""

    session: InferenceSessionState
    hidden_states: torch.Tensor  # [batch, tokens, hidden]
    position_ids: torch.Tensor
    new_mask: torch.Tensor
    beam_reorder: torch.Tensor | None = None
    start_position: int | None = None
    done_tokens: int = 0
    outputs: list[torch.Tensor] = field(default_factory=list)

    @property
    def first_position(self) -> int:
        """Where this work's next tokens go in the cache (a rollback not yet applied counts)."""
        if self.done_tokens == 0 and self.start_position is not None:
            return self.start_position
        return self.session.position

    @property
    def remaining_tokens(self) -> int:
        return self.hidden_states.shape[1] - self.done_tokens

    def output(self) -> torch.Tensor:
        return self.outputs[0] if len(self.outputs) == 1 else torch.cat(self.outputs, dim=1)
