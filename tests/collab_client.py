"""`python -m tests.collab_client ...`: one member of a collaborative LoRA run through the swarm, as a process of its
own (tests/test_collaboration.py starts several).

Per epoch of its schedule it trains one batch of its own data (`member_batch`), waits for the collaboration's step and
writes its LoRA factors (peft names) to OUT/member{M}-epoch{E}.safetensors. A member that starts at a later epoch
downloads the collaboration's state first. `--start-file` and `--finish-file` hold it before the first batch and
after the last epoch (a run that lives while the test looks at it). `--pause-at-epoch E` stops before epoch E's batch and says so (the test
kills it there: a member dying mid-run).
"""

import argparse
import sys
import time
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import save_file

from client import AutoDistributedModelForCausalLM
from client.collaboration import CollaborativeOptimizer

LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
INIT_SEED = 1234  # every member starts from the same factors
SEQUENCE_LENGTH = 8


def member_batch(member: int, epoch: int, rows: int, vocab_size: int) -> torch.Tensor:
    """Member `member`'s own data for `epoch`: no two members or epochs share a batch."""
    generator = torch.Generator().manual_seed(1000 * member + epoch)
    return torch.randint(0, vocab_size, (rows, SEQUENCE_LENGTH), generator=generator)


def make_optimizer(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """SGD with momentum: its steps are continuous in the gradients, so the float rounding of averaging stays as
    small in the parameters (Adam's first step is the gradients' signs: a rounding can flip one of an element whose
    gradient is about zero)."""
    return torch.optim.SGD(params, lr=0.5, momentum=0.9)


def wait_for_file(path: str | None, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while path and not Path(path).exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--initial-peer", required=True)
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--member", type=int, required=True)
    parser.add_argument("--rows", required=True, help="rows of each epoch's batch, comma-separated")
    parser.add_argument("--first-epoch", type=int, default=0)
    parser.add_argument("--start-file", help="wait until this file exists before the first batch")
    parser.add_argument("--target", type=int, required=True)
    parser.add_argument("--hold", type=float, default=60.0)
    parser.add_argument("--matchmaking", type=float, default=3.0)
    parser.add_argument("--pause-at-epoch", type=int, default=-1)
    parser.add_argument("--out", required=True)
    parser.add_argument("--save-adapter", help="at the end, save the LoRA here as a peft adapter folder")
    parser.add_argument("--finish-file", help="after the last epoch, stay in the run until this file exists")
    args = parser.parse_args()
    schedule = [int(rows) for rows in args.rows.split(",")]

    torch.manual_seed(INIT_SEED)
    model = AutoDistributedModelForCausalLM.from_pretrained(
        args.model, initial_peers=[args.initial_peer], tuning_mode="lora", lora_config=LORA
    )
    optimizer = CollaborativeOptimizer(
        model, run_id=args.run_id, target_batch_size=args.target, batch_size_per_step=max(schedule),
        optimizer=make_optimizer, matchmaking_time=args.matchmaking, averaging_timeout=30.0,
        tracker_opts={"metadata_expiration": 20.0}, verbose=True,
    )
    with optimizer:
        if args.first_epoch > 0:
            optimizer.load_state_from_peers()
            print(f"downloaded the state of epoch {optimizer.local_epoch}", flush=True)
            if optimizer.local_epoch != args.first_epoch:
                sys.exit(f"expected to join at epoch {args.first_epoch}, the collaboration is at {optimizer.local_epoch}")
        save_file(model.lora.peft_state_dict(), str(Path(args.out) / f"member{args.member}-start.safetensors"))
        print(f"member {args.member} joined run {args.run_id}", flush=True)
        wait_for_file(args.start_file)
        for epoch, rows in enumerate(schedule, start=args.first_epoch):
            if epoch == args.pause_at_epoch:
                print(f"pausing at epoch {epoch}", flush=True)
                time.sleep(3600)
            ids = member_batch(args.member, epoch, rows, model.config.vocab_size)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step(batch_size=rows)
            optimizer.zero_grad()
            if not optimizer.wait_for_epoch(epoch + 1, timeout=120.0, hold=args.hold):
                sys.exit(f"member {args.member}: the collaboration did not reach epoch {epoch + 1}")
            save_file(model.lora.peft_state_dict(), str(Path(args.out) / f"member{args.member}-epoch{epoch + 1}.safetensors"))
            print(f"epoch {epoch + 1} loss {loss.item():.4f}", flush=True)
        if args.save_adapter:
            model.save_lora(args.save_adapter)
        wait_for_file(args.finish_file)
    model.close()


if __name__ == "__main__":
    main()
