"""Forward+backward through the blocks: a local swarm (2 peers x half the blocks) against local transformers.

    python -m bench.bench_training [--hidden 1024 --layers 8 --batch 4 --length 128 --repeats 5]

Both sides run the blocks forward and backward to the input hidden states (what prompt tuning needs); peers keep
no state between the calls, so their backward recomputes the forward pass. Prints tokens/s and the ratio.
"""

import argparse
import tempfile

import torch
from transformers import LlamaForCausalLM
from transformers.masking_utils import create_causal_mask

from bench.common import add_model_arguments, halves, interleaved_medians, model_config
from client import AutoDistributedModelForCausalLM
from peer.local_swarm import local_swarm
from swarm.checkpoint_maker import save_random_checkpoint


def local_blocks_step(model: LlamaForCausalLM, hidden: torch.Tensor, weights: torch.Tensor) -> None:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    # Training steps are compute-bound and only one peer computes at a time: each may use every core.
    parser.add_argument("--peer-threads", type=int, default=2)
    args = parser.parse_args()

    config = model_config(args)
    with tempfile.TemporaryDirectory() as folder:
        save_random_checkpoint(folder, config)
        local = LlamaForCausalLM.from_pretrained(folder).eval().requires_grad_(False)
        hidden = torch.randn(args.batch, args.length, args.hidden)
        weights = torch.randn(args.batch, args.length, args.hidden)
        peer_args = ("--num-threads", str(args.peer_threads))
        with local_swarm(folder, halves(args.layers), *peer_args) as bootstrap:
            swarm = AutoDistributedModelForCausalLM.from_pretrained(folder, initial_peers=[bootstrap])
            try:
                seconds = interleaved_medians(
                    {"local": lambda: local_blocks_step(local, hidden, weights),
                     "swarm": lambda: swarm_blocks_step(swarm, hidden, weights)},
                    args.repeats,
                )
            finally:
                swarm.close()
    tokens = args.batch * args.length
    local_rate, swarm_rate = tokens / seconds["local"], tokens / seconds["swarm"]
    print(f"forward+backward through {args.layers} blocks (hidden {args.hidden}, fp32), batch {args.batch} x "
          f"{args.length} tokens, 2 peers x {args.layers // 2} blocks on loopback ({args.peer_threads} thread(s) each), median of {args.repeats}")
    print(f"local transformers: {local_rate:8.1f} tokens/s")
    print(f"swarm:              {swarm_rate:8.1f} tokens/s")
    print(f"ratio swarm/local:  {swarm_rate / local_rate:8.2f}x")


if __name__ == "__main__":
    main()
