"""Greedy generation through a local swarm (2 peers x half the blocks) against local transformers, same run.

    python bench/bench_generation.py [--hidden 1024 --layers 8 --new-tokens 128 --repeats 5]

Prints tokens/s of both and their ratio (medians of --repeats runs).
"""

import argparse
import tempfile

import torch
from transformers import LlamaForCausalLM

from bench.common import add_model_arguments, halves, interleaved_medians, model_config
from client import AutoDistributedModelForCausalLM
from peer.local_swarm import local_swarm
from swarm.checkpoint_maker import save_random_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--peer-threads", type=int, default=1)
    args = parser.parse_args()

    config = model_config(args)
    with tempfile.TemporaryDirectory() as folder:
        save_random_checkpoint(folder, config)
        local = LlamaForCausalLM.from_pretrained(folder).eval()
        params = sum(p.numel() for p in local.parameters()) / 1e6
        prompt = torch.randint(3, config.vocab_size, (1, args.prompt_tokens))
        options = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)

        # Two peers and the client share this machine's cores: each peer computes with --peer-threads threads.
        peer_args = ("--num-threads", str(args.peer_threads))
        with local_swarm(folder, halves(args.layers), *peer_args) as bootstrap:
            swarm = AutoDistributedModelForCausalLM.from_pretrained(folder, initial_peers=[bootstrap])
            try:
                seconds = interleaved_medians(
                    {"local": lambda: local.generate(prompt, **options), "swarm": lambda: swarm.generate(prompt, **options)},
                    args.repeats,
                )
                same = torch.equal(local.generate(prompt, **options), swarm.generate(prompt, **options))
            finally:
                swarm.close()

    local_rate, swarm_rate = args.new_tokens / seconds["local"], args.new_tokens / seconds["swarm"]
    print(f"model: llama {params:.0f}M params (hidden {args.hidden}, {args.layers} layers, fp32), "
          f"2 peers x {args.layers // 2} blocks on loopback ({args.peer_threads} thread(s) each), batch 1, {args.new_tokens} new tokens, median of {args.repeats}")
    print(f"local transformers: {local_rate:8.1f} tokens/s")
    print(f"swarm:              {swarm_rate:8.1f} tokens/s")
    print(f"ratio swarm/local:  {swarm_rate / local_rate:8.2f}x   (same tokens: {same})")


if __name__ == "__main__":
    main()
