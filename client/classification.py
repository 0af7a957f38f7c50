"""Sequence classification on the swarm: frozen remote blocks, a trainable head on the client."""

from pathlib import Path

import torch
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutputWithPast

from client.model import AutoDistributedModelForCausalLM


class DistributedModelForSequenceClassification(nn.Module):
    """Scores the hidden state of each sequence's last non-padding token, as `...ForSequenceClassification` does."""

    def __init__(self, backbone: nn.Module, num_labels: int):
        super().__init__()
        self.backbone, self.num_labels = backbone, num_labels
        config = backbone.config
        self.score = nn.Linear(config.hidden_size, num_labels, bias=False, dtype=backbone.dtype)
        nn.init.normal_(self.score.weight, std=getattr(config, "initializer_range", 0.02))

    @classmethod
    def from_pretrained(cls, model_path: str | Path, num_labels: int = 2, **options) -> "DistributedModelForSequenceClassification":
        """`options` are those of AutoDistributedModelForCausalLM.from_pretrained (initial_peers, tuning_mode, ...)."""
        return cls(AutoDistributedModelForCausalLM.from_pretrained(model_path, **options), num_labels)

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> SequenceClassifierOutputWithPast:
        backbone = self.backbone
        hidden = backbone.family.embed(backbone, input_ids, None)
        hidden = backbone.run_blocks(hidden, mask=None if attention_mask is None else attention_mask.bool())
        logits = self.score(backbone.family.final_norm(backbone, hidden))
        pad = backbone.config.pad_token_id
        positions = torch.arange(input_ids.shape[1])
        last = (positions * (input_ids != pad)).argmax(-1) if pad is not None else torch.full_like(input_ids[:, 0], -1)
        pooled = logits[torch.arange(input_ids.shape[0]), last]
        loss = None
        if labels is not None:
            if self.num_labels == 1:
                loss = nn.functional.mse_loss(pooled.squeeze(-1), labels.to(pooled.dtype))
            else:
                loss = nn.functional.cross_entropy(pooled.view(-1, self.num_labels), labels.view(-1))
        return SequenceClassifierOutputWithPast(loss=loss, logits=pooled)

    def close(self) -> None:
        self.backbone.close()
