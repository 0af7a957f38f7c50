"""The Python client: models whose transformer blocks run on the swarm."""

from swarm.logs import quiet_imports

# transformers imports torchao (when installed), which logs at import that its optional CUDA kernels are absent.
with quiet_imports():
    from client.classification import DistributedModelForSequenceClassification
    from client.config import ClientConfig
    from client.inference_session import InferenceSession
    from client.model import AutoDistributedModelForCausalLM
    from client.petals_names import (
        AutoDistributedModelForSequenceClassification,
        DistributedBloomForCausalLM,
        DistributedBloomForSequenceClassification,
        DistributedFalconForCausalLM,
        DistributedLlamaForCausalLM,
        DistributedLlamaForSequenceClassification,
        DistributedMixtralForCausalLM,
    )
    from client.remote_sequential import RemoteSequential

__all__ = [
    "AutoDistributedModelForCausalLM",
    "AutoDistributedModelForSequenceClassification",
    "ClientConfig",
    "DistributedBloomForCausalLM",
    "DistributedBloomForSequenceClassification",
    "DistributedFalconForCausalLM",
    "DistributedLlamaForCausalLM",
    "DistributedLlamaForSequenceClassification",
    "DistributedMixtralForCausalLM",
    "DistributedModelForSequenceClassification",
    "InferenceSession",
    "RemoteSequential",
]
