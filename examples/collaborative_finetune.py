"""Three clients train one LoRA together through a local swarm of the demo model, each on its own shard of the data.

    python examples/collaborative_finetune.py [--members 3] [--epochs 12]

A bootstrap node and two peers (blocks 0:2 and 2:4) serve the frozen model. Each member is a process of its own
with its own shard of a small data set; `CollaborativeOptimizer` averages their gradients over the swarm's DHT, so
every epoch is one AdamW step on the union of the shards. Member 0 saves the result as a peft adapter; a peer then
hosts it (`swarm-peer serve --adapters`) and a plain client generates with it.

`python examples/collaborative_finetune.py member ...` is one member (started by the above); it prints, per epoch,
its loss and how long its batch and the collaboration's step took (bench/collaboration.py reads those lines).
"""

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig
from transformers import AutoTokenizer

from client import AutoDistributedModelForCausalLM
from client.collaboration import CollaborativeOptimizer
from peer.local_swarm import local_swarm, start_peers

DEMO_MODEL = Path(__file__).resolve().parent / "demo_model"
FACTS = [
    "Swarm: volunteers pool their machines to run language models together.",
    "Swarm: each peer serves a span of the model's blocks.",
    "Swarm: a client keeps the embeddings and the head.",
    "Swarm: the DHT tells everyone who serves what.",
    "Swarm: gradients flow back through remote blocks.",
    "Swarm: many clients can train one adapter together.",
]
LORA = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"], lora_dropout=0.0)
INIT_SEED = 0  # every member starts from the same LoRA factors


def shard_batch(tokenizer, member: int, members: int) -> dict[str, torch.Tensor]:
    """Member `member`'s shard: every `members`-th fact, padded into one batch (padding is no label)."""
    batch = tokenizer(FACTS[member::members], return_tensors="pt", padding=True)
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return batch


def run_member(args: argparse.Namespace) -> None:
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    torch.manual_seed(INIT_SEED)
    model = AutoDistributedModelForCausalLM.from_pretrained(
        args.model, initial_peers=[args.initial_peer], tuning_mode="lora", lora_config=LORA
    )
    batch = shard_batch(tokenizer, args.member, args.members)
    rows = batch["input_ids"].shape[0]
    optimizer = CollaborativeOptimizer(
        model, run_id=args.run_id, target_batch_size=rows * args.members, batch_size_per_step=rows,
        optimizer=lambda params: torch.optim.AdamW(params, lr=args.lr), matchmaking_time=args.matchmaking,
        group_size=args.members if args.group_size else None,
        progress_bar=args.member == 0 and sys.stderr.isatty(),
    )
    with optimizer:
        print(f"member {args.member} joined with {rows} rows", flush=True)
        while not Path(args.start_file).exists():
            time.sleep(0.05)
        for epoch in range(args.epochs):
            started = time.perf_counter()
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            computed = time.perf_counter()
            if not optimizer.wait_for_epoch(epoch + 1, timeout=120.0, hold=60.0):
                sys.exit(f"member {args.member}: the collaboration did not reach epoch {epoch + 1}")
            print(f"epoch {epoch + 1} loss {loss.item():.4f} rows {rows} compute_s {computed - started:.3f} "
                  f"step_s {time.perf_counter() - computed:.3f}", flush=True)
        if args.save_adapter:
            model.save_lora(args.save_adapter)
    model.close()


def member_command(model: str, initial_peer: str, member: int, members: int, epochs: int, start_file: Path,
                   run_id: str, save_adapter: str = "", group_size: bool = True) -> list[str]:
    command = [sys.executable, __file__, "member", "--model", model, "--initial-peer", initial_peer,
               "--member", str(member), "--members", str(members), "--epochs", str(epochs),
               "--start-file", str(start_file), "--run-id", run_id]
    return command + (["--save-adapter", save_adapter] if save_adapter else []) + ([] if group_size else ["--no-group-size"])


def run_members(model: str, initial_peer: str, members: int, epochs: int, run_id: str, save_adapter: str = "",
                group_size: bool = True) -> list[list[str]]:
    """Starts the members, lets them begin together, and returns each one's output lines."""
    with tempfile.TemporaryDirectory() as scratch:
        start_file = Path(scratch) / "go"
        logs = [open(Path(scratch) / f"member{member}.log", "w+") for member in range(members)]  # hivemind's chatter
        processes = [subprocess.Popen(member_command(model, initial_peer, member, members, epochs, start_file, run_id,
                                                     save_adapter if member == 0 else "", group_size),
                                      stdout=subprocess.PIPE, stderr=logs[member], text=True) for member in range(members)]
        try:
            for process in processes:  # each says it joined before any begins
                while "joined" not in (line := process.stdout.readline()):
                    if not line and process.poll() is not None:
                        raise SystemExit("a member failed to start:\n" + _tail(logs[processes.index(process)]))
            start_file.touch()
            outputs = [process.communicate(timeout=600)[0].splitlines() for process in processes]
        finally:
            for process, log in zip(processes, logs):
                process.kill()
                log.close()
            failed = [member for member, process in enumerate(processes) if process.returncode]
            if failed:
                raise SystemExit(f"member {failed[0]} failed:\n" + _tail(logs[failed[0]]))
        return outputs


def _tail(log, characters: int = 4000) -> str:
    log.seek(0)
    return log.read()[-characters:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("role", nargs="?", default="demo", choices=["demo", "member"])
    parser.add_argument("--model", default=str(DEMO_MODEL))
    parser.add_argument("--members", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--matchmaking", type=float, default=3.0)
    parser.add_argument("--run-id", default="demo-lora")
    parser.add_argument("--no-group-size", dest="group_size", action="store_false",
                        help="member: let each round wait matchmaking_time instead of for all --members")
    parser.add_argument("--initial-peer", help="member: the swarm's bootstrap multiaddr")
    parser.add_argument("--member", type=int, default=0)
    parser.add_argument("--start-file", help="member: begin once this file exists")
    parser.add_argument("--save-adapter", default="", help="member: save the LoRA here at the end")
    args = parser.parse_args()
    if args.role == "member":
        run_member(args)
        return

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    prompt = tokenizer(["Swarm:"], return_tensors="pt")["input_ids"]
    adapter = Path(tempfile.mkdtemp(prefix="collab-lora-"))
    print("starting a bootstrap node and 2 peers ...", flush=True)
    with local_swarm(args.model, ["0:2", "2:4"], "--num-threads", "1") as bootstrap:
        print(f"{args.members} members train one LoRA, each on its own shard ...", flush=True)
        outputs = run_members(args.model, bootstrap, args.members, args.epochs, args.run_id, str(adapter))
        for epoch_lines in zip(*outputs):
            losses = "  ".join(line.split()[3] for line in epoch_lines)
            print(f"{epoch_lines[0].split()[0]} {epoch_lines[0].split()[1]:>3}  members' losses {losses}")
        print(f"saved the shared adapter to {adapter}; a third peer hosts it ...", flush=True)
        (host,) = start_peers(args.model, bootstrap, ["0:4"], "--num-threads", "1", "--adapters", f"learned={adapter}")
        try:
            plain, tuned = (AutoDistributedModelForCausalLM.from_pretrained(args.model, initial_peers=[bootstrap],
                                                                            active_adapter=name)
                            for name in ("", "learned"))
            try:
                before = plain.generate(prompt, max_new_tokens=16, do_sample=False)
                after = tuned.generate(prompt, max_new_tokens=16, do_sample=False)
            finally:
                plain.close()
                tuned.close()
        finally:
            host.process.stop()
    print(f"\nwithout the adapter: {tokenizer.decode(before[0], skip_special_tokens=True)!r}")
    print(f"with the adapter:    {tokenizer.decode(after[0], skip_special_tokens=True)!r}")


if __name__ == "__main__":
    main()
