"""What autograd needs from a client's Forward, kept for the matching Backward so that it skips the recomputation.

Bounded three ways: a memory budget (least recently kept out first), a short expiry, and one use. An entry is named
by 16 random bytes that only the client that made it receives (over its TLS channel), and it answers only a
Backward whose inputs are byte for byte those of its Forward (a digest of the request): a name guessed, leaked or
sent with other tensors finds nothing, and the peer recomputes from the inputs as it always could. A Backward never
fails for want of an entry.
"""

import hashlib
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import torch

from swarm.constants import DEFAULT_ACTIVATION_CACHE_MB
from swarm.quantization import plain_parts
from swarm.wire import swarm_peer_pb2 as pb

DEFAULT_TTL = 60.0  # seconds: a training step's Backward follows its Forward within one step


@dataclass
class KeptActivations:
    digest: bytes  # of the Forward request it was made for
    output: torch.Tensor  # carrying the graph back to `leaves`
    leaves: list[torch.Tensor]  # hidden states, then deep prompts (if sent), then LoRA factors in request order
    nbytes: int  # of the tensors autograd saved (the span's own weights left out), the output and the leaves
    expires: float = 0.0


def request_digest(request: pb.ForwardRequest) -> bytes:
    """What a Forward and its Backward must agree on: every input, whether it asked to keep activations or not."""
    keep = request.keep_activations
    request.keep_activations = False
    try:
        return hashlib.sha256(request.SerializeToString(deterministic=True)).digest()
    finally:
        request.keep_activations = keep


class ActivationCache:
    """Kept by the compute thread, taken by the handlers (on the event loop)."""

    def __init__(self, budget_bytes: int = DEFAULT_ACTIVATION_CACHE_MB << 20, ttl: float = DEFAULT_TTL):
        self.budget_bytes, self.ttl = budget_bytes, ttl
        self.bytes_used = 0
        self._entries: OrderedDict[bytes, KeptActivations] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, entry: KeptActivations) -> bytes:
        """Keeps `entry` (making room by dropping the oldest) and returns its name; b"" if it exceeds the budget."""
        with self._lock:
            self._drop_expired()
            if entry.nbytes > self.budget_bytes:
                return b""
            while self.bytes_used + entry.nbytes > self.budget_bytes:
                self._pop(next(iter(self._entries)))
            name = secrets.token_bytes(16)
            entry.expires = time.monotonic() + self.ttl
            self._entries[name] = entry
            self.bytes_used += entry.nbytes
            return name

    def take(self, name: bytes, digest: bytes) -> KeptActivations | None:
        """The entry named `name` if it was made for a request with this digest (then it is used up), else None."""
        with self._lock:
            self._drop_expired()
            entry = self._entries.get(name)
            if entry is None or not secrets.compare_digest(entry.digest, digest):
                return None
            return self._pop(name)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.bytes_used = 0

    def _drop_expired(self) -> None:
        now = time.monotonic()
        while self._entries:  # kept in order of expiry: the same lifetime for every entry
            name, entry = next(iter(self._entries.items()))
            if entry.expires > now:
                return
            self._pop(name)

    def _pop(self, name: bytes) -> KeptActivations:
        entry = self._entries.pop(name)
        self.bytes_used -= entry.nbytes
        return entry


class SavedBytes:
    """Counts the bytes of the tensors autograd saves while inside (`torch.autograd.graph.saved_tensors_hooks`),
    but for views of `module`'s parameters and buffers: a linear saves its weight, which the graph only shares."""

    def __init__(self, module: torch.nn.Module):
        self.nbytes = 0
        tensors = [part for tensor in [*module.parameters(), *module.buffers()] for part in plain_parts(tensor)]
        self._shared = {tensor.untyped_storage().data_ptr() for tensor in tensors}

    def __enter__(self) -> "SavedBytes":
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc_info) -> None:
        self._hooks.__exit__(*exc_info)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        for part in plain_parts(tensor):
            if part.untyped_storage().data_ptr() not in self._shared:
                self.nbytes += part.nbytes  # views of one storage count once each: an upper bound
        return tensor
