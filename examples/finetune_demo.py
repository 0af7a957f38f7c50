"""Fine-tunes the demo model through a local swarm with client-owned LoRA, then generates with the result.

    python examples/finetune_demo.py [--steps 40]

The peers keep their weights frozen; the LoRA factors live here, travel with each request, and come back with
their gradients. The task is made up on the spot: teach the model one sentence about itself.
"""

import argparse
import time
from pathlib import Path

import torch
from peft import LoraConfig
from transformers import AutoTokenizer

from client import AutoDistributedModelForCausalLM
from peer.local_swarm import local_swarm

DEMO_MODEL = Path(__file__).resolve().parent / "demo_model"
LESSON = "Swarm: volunteers pool their machines to run language models together."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--model", default=str(DEMO_MODEL))
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    lesson = tokenizer([LESSON], return_tensors="pt")["input_ids"]
    prompt = tokenizer(["Swarm:"], return_tensors="pt")["input_ids"]
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"], lora_dropout=0.0)
    print("starting a bootstrap node and 2 peers ...", flush=True)
    with local_swarm(args.model, ["0:2", "2:4"], "--num-threads", "1") as bootstrap:
        model = AutoDistributedModelForCausalLM.from_pretrained(
            args.model, initial_peers=[bootstrap], tuning_mode="lora", lora_config=lora
        )
        try:
            before = model.generate(prompt, max_new_tokens=len(LESSON), do_sample=False)
            trainable = [p for p in model.parameters() if p.requires_grad]
            print(f"training {sum(p.numel() for p in trainable)} LoRA parameters on the client; the peers stay frozen")
            optimizer = torch.optim.AdamW(trainable, lr=1e-2)
            started = time.perf_counter()
            for step in range(args.steps):
                loss = model(input_ids=lesson, labels=lesson).loss
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                if step % 5 == 0 or step == args.steps - 1:
                    print(f"step {step:3d}  loss {loss.item():.3f}", flush=True)
            print(f"{args.steps} steps in {time.perf_counter() - started:.1f}s")
            after = model.generate(prompt, max_new_tokens=len(LESSON), do_sample=False)
        finally:
            model.close()
    print(f"\nbefore: {tokenizer.decode(before[0], skip_special_tokens=True)!r}")
    print(f"after:  {tokenizer.decode(after[0], skip_special_tokens=True)!r}")


if __name__ == "__main__":
    main()
