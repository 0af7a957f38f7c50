"""One forward pass of several sessions' steps together: rows of every session in one batch per block.

Each session keeps its own position, mask and pages; the pass gathers them into a left-padded batch (see
`kv_pages`), so a session gets the same hidden states as when it runs alone (to float rounding).
"""

import torch

from peer.adapters import adapter_lora
from peer.kv_pages import PagedKV, PagedPassCache
from peer.lora import loras_applied
from peer.sessions import InferenceSessionState, StepWork
from swarm.blocks import BlockSpan


def pass_key(work: StepWork, num_tokens: int) -> tuple:
    """Steps with equal keys can share a pass: same blocks, same adapters, same number of new tokens."""
    session = work.session
    hosted = session.adapter.name if session.adapter else ""
    own_prompts = session.deep_prompts_from(work.first_position, num_tokens) is not None
    alone = id(work) if own_prompts else 0  # deep prompts still to add: this session runs alone
    return session.blocks.start, session.blocks.stop, hosted, id(session.lora) if session.lora else 0, alone, num_tokens


def run_pass(span: BlockSpan, kv: PagedKV, works: list[StepWork], num_tokens: int) -> None:
    """Runs the next `num_tokens` tokens of each work (all with the same `pass_key`) and stores their outputs."""
    sessions = [work.session for work in works]
    with torch.inference_mode():
        for work in works:
            if work.done_tokens == 0:
                work.session.prepare(kv, work.beam_reorder, work.start_position)
        chunks = [slice(work.done_tokens, work.done_tokens + num_tokens) for work in works]
        for session, work, chunk in zip(sessions, works, chunks):
            session.mask[:, session.position : session.position + num_tokens] = work.new_mask[:, chunk]
        hidden = _rows([work.hidden_states[:, chunk] for work, chunk in zip(works, chunks)])
        position_ids = _rows([work.position_ids[:, chunk] for work, chunk in zip(works, chunks)])
        device = next(span.parameters()).device
        read_slots, attention_mask, past = _cached_rows(kv, sessions, num_tokens)
        cache = PagedPassCache(kv, read_slots.to(device), past)
        first = sessions[0]
        deep_prompts = first.deep_prompts_from(first.position, num_tokens)  # a session with these runs alone
        with loras_applied(span, adapter_lora(first.adapter), (first.lora, first.lora_scaling)):
            output = span(
                hidden.to(device), position_ids.to(device), attention_mask.to(device), cache=cache, blocks=first.blocks,
                deep_prompts=None if deep_prompts is None else deep_prompts.to(device),
            )
    for work, rows in zip(works, output.split([s.batch_size for s in sessions])):
        work.outputs.append(rows)
        work.done_tokens += num_tokens
        work.session.position += num_tokens


def _cached_rows(
    kv: PagedKV, sessions: list[InferenceSessionState], num_tokens: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The KV slots and the attention mask of every row's tokens so far (the new ones included, their mask set), as
    a left-padded batch: [rows, past + num_tokens] each, `past` the longest row's cached tokens."""
    past = max(session.position for session in sessions)
    total = past + num_tokens
    slots = [session.slot_table(kv)[:, :total] for session in sessions]
    masks = [session.mask[:, :total] for session in sessions]
    if all(session.position == past for session in sessions):  # no padding (one session, or equal lengths)
        return _rows(slots), _rows(masks), past
    lengths = torch.tensor([session.position for session in sessions for _ in range(session.batch_size)])
    positions = torch.arange(total) - (past - lengths)[:, None]  # each row's own position; negative: padding
    clamped = positions.clamp(min=0)  # padding reads a real slot of its row (finite values), masked out
    return _padded_rows(slots).gather(1, clamped), _padded_rows(masks).gather(1, clamped) & (positions >= 0), past


def _rows(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def _padded_rows(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Concatenates [rows, n_i] tensors along rows, padding each on the right to the widest."""
    width = max(tensor.shape[1] for tensor in tensors)
    if all(tensor.shape[1] == width for tensor in tensors):
        return _rows(tensors)
    padded = tensors[0].new_zeros(sum(tensor.shape[0] for tensor in tensors), width)
    row = 0
    for tensor in tensors:
        padded[row : row + tensor.shape[0], : tensor.shape[1]] = tensor
        row += tensor.shape[0]
    return padded
