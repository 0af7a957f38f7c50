"""RemoteSequential: a torch module standing for a range of the model's blocks, run by peers of the swarm."""

import grpc
import torch
from torch import nn

from client.config import ClientConfig
from client.inference_session import InferenceSession
from client.swarm_view import SwarmView
from client.transport import PeerConnections
from swarm import tensors
from swarm.errors import RemoteError
from swarm.tensors import DTYPES
from swarm.wire import swarm_peer_pb2 as pb


class RemoteSequential(nn.Module):
    def __init__(
        self,
        model_prefix: str,
        num_blocks: int,
        config: ClientConfig,
        view: SwarmView | None = None,
        start_block: int = 0,
        end_block: int | None = None,
    ):
        super().__init__()
        self.model_prefix, self.config = model_prefix, config
        self.view = view or SwarmView(model_prefix, num_blocks, config)
        self.connections = PeerConnections(config.max_message_bytes)
        self.start_block = start_block
        self.end_block = num_blocks if end_block is None else end_block

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Stateless pass through every block: [batch, seq, hidden] in, the same out."""
        batch, length = hidden_states.shape[:2]
        if position_ids is None:
            position_ids = torch.arange(length).expand(batch, length)
        if attention_mask is None:
            attention_mask = torch.ones(batch, length, dtype=torch.bool)
        output_dtype = hidden_states.dtype
        encoded_positions = tensors.encode(position_ids.cpu().long())
        encoded_mask = tensors.encode(attention_mask.cpu().bool())
        for hop in self.view.chain(self.start_block, self.end_block):
            request = pb.ForwardRequest(
                start_block=hop.start,
                end_block=hop.end,
                hidden_states=tensors.encode(hidden_states.to(DTYPES[hop.peer.record.dtype])),
                position_ids=encoded_positions,
                attention_mask=encoded_mask,
            )
            try:
                response = self.connections.stub(hop.peer.record.address).Forward(
                    request, timeout=self.config.request_timeout
                )
            except grpc.RpcError as error:
                raise RemoteError(hop.peer.peer_id, error.code().name, error.details() or "") from None
            hidden_states = tensors.decode(response.hidden_states)
        return hidden_states.to(output_dtype)

    def inference_session(self, max_length: int) -> InferenceSession:
        return InferenceSession(self, max_length)

    def close(self) -> None:
        self.connections.close()
        self.view.shutdown()
