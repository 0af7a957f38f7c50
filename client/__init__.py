"""The Python client: models whose transformer blocks run on the swarm."""

from client.classification import DistributedModelForSequenceClassification
from client.config import ClientConfig
from client.model import AutoDistributedModelForCausalLM
from client.remote_sequential import RemoteSequential

__all__ = [
    "AutoDistributedModelForCausalLM",
    "ClientConfig",
    "DistributedModelForSequenceClassification",
    "RemoteSequential",
]
