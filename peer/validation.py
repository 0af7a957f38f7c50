"""Checks on every request before it touches the model: a bad request gets a clear reason and changes nothing."""

from dataclasses import dataclass

import torch

from swarm import tensors
from swarm.constants import SPAN_MOVED_STATUS
from swarm.wire import swarm_peer_pb2 as pb


class InvalidRequest(ValueError):
    """The request is malformed; `code` is the gRPC status name the client sees."""

    def __init__(self, message: str, code: str = "INVALID_ARGUMENT"):
        super().__init__(message)
        self.code = code


def decode_tensor(message: pb.Tensor, what: str) -> torch.Tensor:
    try:
        return tensors.decode(message)
    except tensors.TensorDecodeError as error:
        raise InvalidRequest(f"{what}: {error}") from None


def check_block_range(start: int, end: int, served_start: int, served_end: int) -> None:
    if not (served_start <= start < end <= served_end):
        raise InvalidRequest(
            f"blocks {start}:{end} are not served here; this peer serves blocks {served_start}:{served_end}",
            code=SPAN_MOVED_STATUS,  # the caller routed by a record older than the peer's span: a stale route
        )


def check_hidden_states(
    hidden: torch.Tensor, hidden_size: int, dtype: torch.dtype, batch_size: int | None, allow_no_tokens: bool = False
) -> None:
    if hidden.ndim != 3 or hidden.shape[-1] != hidden_size:
        raise InvalidRequest(f"hidden_states must be [batch, tokens, {hidden_size}], got {list(hidden.shape)}")
    if hidden.dtype != dtype:
        raise InvalidRequest(f"hidden_states must be {dtype} (this peer's dtype), got {hidden.dtype}")
    if batch_size is not None and hidden.shape[0] != batch_size:
        raise InvalidRequest(f"the session was opened for batch size {batch_size}, got {hidden.shape[0]}")
    if hidden.shape[0] == 0 or (hidden.shape[1] == 0 and not allow_no_tokens):
        raise InvalidRequest(f"hidden_states must not be empty, got {list(hidden.shape)}")
    if not torch.isfinite(hidden).all():
        raise InvalidRequest("hidden_states contain NaN or Inf")


@dataclass
class SpanInputs:
    """Decoded, checked inputs for running hidden states through blocks."""

    hidden_states: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor  # [batch, new tokens] bool


def decode_span_inputs(
    hidden_msg: pb.Tensor,
    position_msg: pb.Tensor,
    mask_msg: pb.Tensor,
    hidden_size: int,
    dtype: torch.dtype,
    batch_size: int | None,
    first_position: int,
    allow_no_tokens: bool = False,
) -> SpanInputs:
    """Decodes hidden states, positions and mask; positions default to first_position + arange, mask to ones.
    `allow_no_tokens`: a [batch, 0, hidden] step is valid (an inference step with nothing new)."""
    hidden = decode_tensor(hidden_msg, "hidden_states")
    check_hidden_states(hidden, hidden_size, dtype, batch_size, allow_no_tokens)
    batch, length = hidden.shape[:2]
    if tensors.is_set(position_msg):
        position_ids = decode_tensor(position_msg, "position_ids")
        if position_ids.dtype != torch.int64 or list(position_ids.shape) != [batch, length]:
            raise InvalidRequest(
                f"position_ids must be int64 [{batch}, {length}], got {position_ids.dtype} {list(position_ids.shape)}"
            )
        if length:  # aminmax of nothing raises
            lowest, highest = position_ids.aminmax()
            if lowest < 0 or highest >= 2**31:
                raise InvalidRequest("position_ids must be in [0, 2**31)")
    else:
        position_ids = torch.arange(first_position, first_position + length).expand(batch, length)
    if tensors.is_set(mask_msg):
        mask = decode_tensor(mask_msg, "attention_mask")
        if mask.dtype != torch.bool or list(mask.shape) != [batch, length]:
            raise InvalidRequest(f"attention_mask must be bool [{batch}, {length}], got {mask.dtype} {list(mask.shape)}")
    else:
        mask = torch.ones(batch, length, dtype=torch.bool)
    return SpanInputs(hidden, position_ids, mask)
