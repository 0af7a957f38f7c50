"""The Python client: models whose transformer blocks run on the swarm."""

from client.config import ClientConfig
from client.model import AutoDistributedModelForCausalLM
from client.remote_sequential import RemoteSequential

__all__ = ["AutoDistributedModelForCausalLM", "ClientConfig", "RemoteSequential"]
