"""The state of one inference session on this peer: its KV cache, attention mask and position."""

import torch

from peer.lora import lora_applied
from swarm.blocks import BlockSpan, SpanCache


class InferenceSessionState:
    """Lives as long as the session's stream; every method that computes runs on the compute runtime's thread."""

    def __init__(
        self,
        session_id: str,
        span: BlockSpan,
        start: int,
        end: int,
        batch_size: int,
        max_length: int,
        lora: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
        lora_scaling: float = 1.0,
    ):
        self.session_id = session_id
        self.lora, self.lora_scaling = lora or {}, lora_scaling
        self.span = span
        self.blocks = slice(start - span.start, end - span.start)
        self.batch_size, self.max_length = batch_size, max_length
        self.position = 0
        self.cache = SpanCache(end - start, max_length, offset=start - span.start)
        self.mask = torch.zeros(batch_size, max_length, dtype=torch.bool)

    @staticmethod
    def cache_bytes(span: BlockSpan, num_blocks: int, batch_size: int, max_length: int, dtype: torch.dtype) -> int:
        """Memory one session's keys and values take, from the config's head layout."""
        config = span.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        element = torch.empty((), dtype=dtype).element_size()
        return 2 * num_blocks * batch_size * max_length * kv_heads * head_dim * element

    def step(
        self,
        hidden_states: torch.Tensor,
        position_ids: torch.Tensor,
        new_mask: torch.Tensor,
        beam_reorder: torch.Tensor | None,
        start_position: int | None,
    ) -> torch.Tensor:
        """Rolls back and/or reorders as asked, then runs the new tokens through the session's blocks."""
        with torch.inference_mode(), lora_applied(self.span, self.lora, self.lora_scaling):
            if start_position is not None:
                self.cache.truncate(start_position)
                self.position = start_position
            if beam_reorder is not None:
                self.cache.reorder_cache(beam_reorder)
                self.mask[:, : self.position] = self.mask[beam_reorder, : self.position]
            end = self.position + hidden_states.shape[1]
            self.mask[:, self.position : end] = new_mask
            device = next(self.span.parameters()).device
            output = self.span(
                hidden_states.to(device),
                position_ids.to(device),
                self.mask[:, :end].to(device),
                cache=self.cache,
                blocks=self.blocks,
            )
            self.position = end
            return output
