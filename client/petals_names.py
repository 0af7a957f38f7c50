"""The class names a Petals user's code imports (`from petals import DistributedLlamaForCausalLM`), so that such code
runs here with an import change. Each family's class checks that the checkpoint is of that family, then builds what
the Auto classes build (they read the family from the checkpoint)."""

from pathlib import Path

from client.classification import DistributedModelForSequenceClassification
from client.model import AutoDistributedModelForCausalLM
from swarm.checkpoint import Checkpoint
from swarm.errors import UnsupportedModelError


def _for_family(name: str, model_type: str, builder: type) -> type:
    def from_pretrained(model_path: str | Path, *args, **options):
        found = Checkpoint(model_path).config.model_type
        if found != model_type:
            raise UnsupportedModelError(
                f"{model_path} holds a {found!r} model, not {model_type!r}: {builder.__name__} takes any family"
            )
        return builder.from_pretrained(model_path, *args, **options)

    return type(name, (), {"from_pretrained": staticmethod(from_pretrained), "__doc__": f"{builder.__name__}, {model_type} only."})


AutoDistributedModelForSequenceClassification = DistributedModelForSequenceClassification
DistributedBloomForCausalLM = _for_family("DistributedBloomForCausalLM", "bloom", AutoDistributedModelForCausalLM)
DistributedLlamaForCausalLM = _for_family("DistributedLlamaForCausalLM", "llama", AutoDistributedModelForCausalLM)
DistributedFalconForCausalLM = _for_family("DistributedFalconForCausalLM", "falcon", AutoDistributedModelForCausalLM)
DistributedMixtralForCausalLM = _for_family("DistributedMixtralForCausalLM", "mixtral", AutoDistributedModelForCausalLM)
DistributedBloomForSequenceClassification = _for_family(
    "DistributedBloomForSequenceClassification", "bloom", DistributedModelForSequenceClassification
)
DistributedLlamaForSequenceClassification = _for_family(
    "DistributedLlamaForSequenceClassification", "llama", DistributedModelForSequenceClassification
)
