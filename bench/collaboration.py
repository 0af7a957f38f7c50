"""Collaborative training: samples/s of 1, 2 and 3 members training one LoRA through a 2-peer swarm of the demo model,
and what the averaging costs per step.

    python -m bench.collaboration [--epochs 10] [--members 1,2,3]

The members are examples/collaborative_finetune.py's, on the same 6-row global batch whatever their number (each has
6/N rows), so every epoch is one AdamW step on the same data: samples/s = 6 / epoch time. The averaging cost is what
an epoch takes beyond the slowest member's forward+backward (matchmaking, all-reduce, the step, the state averaging
started in the background), with rounds that begin once all members joined (`group_size`) and with rounds that wait
for `matchmaking_time` (3 s). Local: transformers + peft, one process, the same step on the same 6 rows.
"""

import argparse
import copy
import importlib.util
import statistics
from pathlib import Path

import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from bench.common import interleaved_timings, rates
from bench.results import machine
from peer.local_swarm import local_swarm

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "collaborative_finetune.py"
WARM_UP_EPOCHS = 2


def load_example():
    spec = importlib.util.spec_from_file_location("collaborative_finetune", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def epoch_figures(outputs: list[list[str]]) -> tuple[list[float], list[float]]:
    """Per epoch after the warm-up: its seconds, and the seconds beyond the slowest member's compute."""
    parsed = [[dict(zip(line.split()[::2], line.split()[1::2])) for line in output if line.startswith("epoch ")]
              for output in outputs]
    epochs, costs = [], []
    for per_member in list(zip(*parsed))[WARM_UP_EPOCHS:]:
        computes = [float(member["compute_s"]) for member in per_member]
        epoch = max(float(member["compute_s"]) + float(member["step_s"]) for member in per_member)
        epochs.append(epoch)
        costs.append(epoch - max(computes))
    return epochs, costs


def local_step_seconds(example, model_path: str, repeats: int) -> list[float]:
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    batch = example.shard_batch(tokenizer, 0, 1)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_path), copy.deepcopy(example.LORA))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)

    def step() -> None:
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()

    return interleaved_timings({"local": step}, repeats)["local"]


def spread(values: list[float], digits: int = 2) -> str:
    return f"{statistics.median(values):.{digits}f} [{min(values):.{digits}f}-{max(values):.{digits}f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--members", default="1,2,3")
    args = parser.parse_args()
    example = load_example()
    model_path = str(example.DEMO_MODEL)
    rows = len(example.FACTS)
    local = local_step_seconds(example, model_path, repeats=10)
    print(f"collaborative training, demo model, {rows}-row global batch, {machine()}")
    print(f"local transformers+peft: {spread(rates(rows, local), 1)} samples/s (step {spread(local, 3)} s)")
    print("| members | rounds begin | samples/s | vs local | epoch s | averaging cost per step s |")
    print("|---:|---|---:|---:|---:|---:|")
    with local_swarm(model_path, ["0:2", "2:4"], "--num-threads", "1") as bootstrap:
        for members in (int(n) for n in args.members.split(",")):
            for group_size in (True, False) if members > 1 else (True,):
                outputs = example.run_members(model_path, bootstrap, members, args.epochs + WARM_UP_EPOCHS,
                                              f"bench-{members}-{group_size}", group_size=group_size)
                epochs, costs = epoch_figures(outputs)
                speeds = rates(rows, epochs)
                ratio = statistics.median(speeds) / (rows / statistics.median(local))
                begins = "all members in" if group_size else "after matchmaking_time"
                print(f"| {members} | {begins} | {spread(speeds, 2)} | {ratio:.2f}x | {spread(epochs)} | "
                      f"{spread(costs)} |", flush=True)


if __name__ == "__main__":
    main()
