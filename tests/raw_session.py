"""An inference stream driven message by message, for tests that talk to a peer below the client."""

import queue

import torch

from swarm import tensors
from swarm.checkpoint_maker import tiny_llama_config
from swarm.wire import swarm_peer_pb2 as pb

HIDDEN = tiny_llama_config().hidden_size
DEADLINE = 60.0  # seconds: a test waiting for an answer that never comes fails instead of hanging


class RawSession:
    def __init__(self, stub, session_id: str, batch_size: int = 1, max_length: int = 16, blocks=(0, 4), alloc_timeout=5.0,
                 **open_fields):
        self.session_id = session_id
        self.step_id = 0
        self.requests: queue.SimpleQueue = queue.SimpleQueue()
        self.requests.put(pb.InferenceRequest(open=pb.OpenSession(
            session_id=session_id, start_block=blocks[0], end_block=blocks[1], batch_size=batch_size,
            max_length=max_length, alloc_timeout=alloc_timeout, **open_fields,
        )))
        self.responses = stub.Inference(iter(self.requests.get, None), timeout=DEADLINE)
        assert next(self.responses).WhichOneof("kind") == "opened"

    def put(self, hidden: torch.Tensor, session_id: str | None = None, step_id: int | None = None, **fields) -> None:
        """Sends a step (by default the next step id) without waiting for its answer."""
        if step_id is None:
            self.step_id += 1
            step_id = self.step_id
        step = pb.InferenceStep(
            session_id=session_id or self.session_id, step_id=step_id, hidden_states=tensors.encode(hidden), **fields
        )
        self.requests.put(pb.InferenceRequest(step=step))

    def receive(self) -> pb.InferenceResponse:
        return next(self.responses)

    def send(self, hidden: torch.Tensor, session_id: str | None = None, **fields) -> pb.InferenceResponse:
        self.put(hidden, session_id, **fields)
        return self.receive()

    def close(self) -> None:
        self.requests.put(None)
        self.responses.cancel()


def hidden(batch=1, tokens=1, size=HIDDEN, dtype=torch.float32, seed=0) -> torch.Tensor:
    return torch.randn(batch, tokens, size, generator=torch.Generator().manual_seed(seed)).to(dtype)


def expect_error(response: pb.InferenceResponse, code: str, text: str) -> None:
    assert response.WhichOneof("kind") == "error", response
    assert response.error.code == code and text in response.error.message, response.error
