"""Forward+backward through the blocks: 2 peers x half the blocks against local transformers.

Both sides run the blocks forward and backward to the input hidden states (what prompt tuning needs); each peer
keeps the Forward's autograd graph for the Backward (peer/activation_cache.py).
"""

import torch
from transformers.masking_utils import create_causal_mask

from bench.common import interleaved_timings, rates
from bench.results import Result
from client import AutoDistributedModelForCausalLM


def local_blocks_step(model, hidden: torch.Tensor, weights: torch.Tensor) -> None:
    hidden = hidden.clone().requires_grad_()
    batch, length = hidden.shape[:2]
    position_ids = torch.arange(length).expand(batch, length)
    mask = create_causal_mask(config=model.config, inputs_embeds=hidden, attention_mask=None, past_key_values=None, position_ids=position_ids)
    rotary = model.model.rotary_emb(hidden, position_ids)
    output = hidden
    for layer in model.model.layers:
        output = layer(output, attention_mask=mask, position_embeddings=rotary, position_ids=position_ids)
    (output * weights).sum().backward()


def swarm_blocks_step(model, hidden: torch.Tensor, weights: torch.Tensor) -> None:
    hidden = hidden.clone().requires_grad_()
    (model.remote(hidden) * weights).sum().backward()


def forward_backward(args, folder: str, local, bootstrap: str) -> Result:
    hidden = torch.randn(args.train_batch, args.train_length, local.config.hidden_size)
    weights = torch.randn_like(hidden)
    local = local.requires_grad_(False)
    swarm = AutoDistributedModelForCausalLM.from_pretrained(folder, initial_peers=[bootstrap])
    try:
        seconds = interleaved_timings(
            {"local": lambda: local_blocks_step(local, hidden, weights), "swarm": lambda: swarm_blocks_step(swarm, hidden, weights)},
            args.repeats,
        )
    finally:
        swarm.close()
    tokens = args.train_batch * args.train_length
    return Result.measured(
        "forward+backward", "tokens/s", rates(tokens, seconds["swarm"]), rates(tokens, seconds["local"]),
        detail=f"batch {args.train_batch} x {args.train_length} tokens, 2 peers",
    )
