"""The demo: a local swarm (bootstrap node + 2 peers on loopback) serving the built-in demo model, and a client
that generates text through it.

    python examples/demo.py ["prompt"] [--new-tokens 80]
"""

import argparse
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from client import AutoDistributedModelForCausalLM
from peer.local_swarm import local_swarm

DEMO_MODEL = Path(__file__).resolve().parent / "demo_model"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompt", nargs="?", default="The function returns a ")
    parser.add_argument("--new-tokens", type=int, default=80)
    parser.add_argument("--model", default=str(DEMO_MODEL))
    args = parser.parse_args()

    print(f"starting a bootstrap node and 2 peers for {args.model} ...", flush=True)
    with local_swarm(args.model, ["0:2", "2:4"], "--num-threads", "1") as bootstrap:
        print(f"swarm up; its DHT is at {bootstrap}", flush=True)
        model = AutoDistributedModelForCausalLM.from_pretrained(args.model, initial_peers=[bootstrap])
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        try:
            route = " -> ".join(f"{hop.peer.record.address} [{hop.start}:{hop.end})" for hop in model.remote.view.chain())
            print(f"route: {route}")
            inputs = tokenizer([args.prompt], return_tensors="pt")
            torch.manual_seed(0)
            started = time.perf_counter()
            output = model.generate(**inputs, max_new_tokens=args.new_tokens, do_sample=True, temperature=0.7, top_k=20)
            seconds = time.perf_counter() - started
        finally:
            model.close()
    new_tokens = output.shape[1] - inputs["input_ids"].shape[1]
    print("\n" + tokenizer.decode(output[0], skip_special_tokens=True) + "\n")
    print(f"{new_tokens} tokens in {seconds:.2f}s: {new_tokens / seconds:.1f} tokens/s through 2 peers")


if __name__ == "__main__":
    main()
