"""Collaborative training: member processes (tests/collab_client.py), each with its own data, train one LoRA through
a real 2-peer swarm with client.collaboration.CollaborativeOptimizer; what they end with is compared with one local
run of transformers + peft on the union of their batches, step by step."""

import contextlib
import copy
import re
import signal
import time
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from rich.console import Console
from safetensors.torch import load_file

from client import AutoDistributedModelForCausalLM
from peer.local_swarm import SwarmProcess, spawn_cli, start_peers
from peer.status import print_status
from swarm.dht_node import swarm_dht
from swarm.swarm_state import take_snapshot
from tests.collab_client import LORA, make_optimizer, member_batch

SPANS = {"first": "0:2", "second": "2:4"}
RUN_TIMEOUT = 120.0
TOLERANCE = 1e-5
PARTIAL_ROUND = "Averaging: received"  # hivemind's warning when a member got back only part of a round

pytestmark = pytest.mark.slow


@pytest.fixture
def members(tiny_llama, bootstrap, peers, tmp_path):
    """`members(member, rows, target, run_id, **options)` starts a member process; all are stopped at the end."""
    started: list[SwarmProcess] = []

    def start(member: int, rows: list[int], target: int, run_id: str, **options) -> SwarmProcess:
        args = ["--model", tiny_llama, "--initial-peer", bootstrap, "--run-id", run_id, "--member", str(member),
                "--rows", ",".join(map(str, rows)), "--target", str(target), "--out", str(tmp_path)]
        for option, value in options.items():
            args += [f"--{option.replace('_', '-')}", str(value)]
        process = spawn_cli(*args, module="tests.collab_client")
        started.append(process)
        return process

    start.partial_rounds = lambda: [line.strip() for process in started for line in process.output
                                    if PARTIAL_ROUND in line]
    yield start
    for index, process in enumerate(started):
        process.stop(signal.SIGKILL)
        (tmp_path / f"process{index}.log").write_text("".join(process.output))
        # what went wrong in a round, shown with a failure (pytest prints a failed test's captured output)
        print(f"member process {index}:", *(line for line in process.output if "WARN" in line or "failed" in line))


def wait_all(processes: list[SwarmProcess], pattern: str) -> None:
    for process in processes:
        process.wait_for_line(pattern, timeout=RUN_TIMEOUT)


def finish(processes: list[SwarmProcess]) -> None:
    for process in processes:
        assert process.process.wait(RUN_TIMEOUT) == 0, "".join(process.output)[-3000:]


def state(out: Path, member: int, when: str | int) -> dict[str, torch.Tensor]:
    name = when if isinstance(when, str) else f"epoch{when}"
    return load_file(str(out / f"member{member}-{name}.safetensors"))


def local_run(reference, start: dict[str, torch.Tensor], epochs: list[list[torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """One process, transformers + peft: each epoch one optimizer step on the union of that epoch's batches.
    Returns the LoRA after each step."""
    local = get_peft_model(copy.deepcopy(reference), copy.deepcopy(LORA))
    set_peft_model_state_dict(local, start)
    optimizer = make_optimizer([parameter for parameter in local.parameters() if parameter.requires_grad])
    states = []
    for batches in epochs:
        ids = torch.cat(batches)
        optimizer.zero_grad()
        local(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        states.append({name: tensor.detach().clone() for name, tensor in get_peft_model_state_dict(local).items()})
    return states


def assert_same(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    assert set(actual) == set(expected)
    worst = max((actual[name] - expected[name]).abs().max().item() for name in expected)
    assert worst <= TOLERANCE, f"{what}: differs by up to {worst:.3g}"


@contextlib.contextmanager
def exact_unless_a_round_came_back_partial(members):
    """The members' states must equal the local run's. hivemind's all-reduce can hand a member back only part of a
    round on a loaded machine (a reducer's result stream ends early: "sent 3 parts, but we expected 7"), and that
    member then keeps its own gradient for the rest: the states part. A mismatch with such a round in the members'
    logs is that known hivemind race, reported as an expected failure; any other mismatch fails."""
    try:
        yield
    except AssertionError as mismatch:
        partial = members.partial_rounds()
        if not partial:
            raise
        pytest.xfail(f"{mismatch}; hivemind returned a partial averaging round: {partial[0]}")


def epochs_of(members_rows: dict[int, dict[int, int]], vocab_size: int) -> list[list[torch.Tensor]]:
    """{member: {epoch: rows}} -> the batches of each epoch, all members together."""
    last = max(epoch for rows in members_rows.values() for epoch in rows)
    return [[member_batch(member, epoch, rows[epoch], vocab_size) for member, rows in sorted(members_rows.items())
             if epoch in rows] for epoch in range(last + 1)]


def test_members_train_like_one_local_run_on_the_union_of_their_batches(members, reference, tiny_llama, bootstrap,
                                                                        tmp_path):
    start_file, finish_file = tmp_path / "go", tmp_path / "done"
    adapter = tmp_path / "adapter"
    processes = [members(member, [2, 2, 2], 6, "together", start_file=start_file, finish_file=finish_file,
                         **({"save_adapter": adapter} if member == 0 else {})) for member in range(3)]
    wait_all(processes, r"joined run")
    start_file.touch()
    # the run as `swarm-peer status` and the dashboard show it, mid-run (its members stay until finish_file)
    wait_all(processes, r"epoch 1 loss")
    dht = swarm_dht(initial_peers=[bootstrap], client_mode=True, start=True)[0]
    try:
        snapshot = take_snapshot(dht)
    finally:
        dht.shutdown()
    [run] = [run for run in snapshot.training if run.record.name == "together"]
    assert run.epoch >= 1 and (run.num_peers, run.record.target_batch_size) == (3, 6)
    console = Console(record=True, width=200)
    print_status(snapshot, console)
    assert re.search(r"together\s+\S+\s+[123]\s+\d+/6\s+3\s", console.export_text()), console.export_text()
    finish_file.touch()
    finish(processes)
    start = state(tmp_path, 0, "start")
    assert run.record.parameters == sum(tensor.numel() for tensor in start.values())
    for member in (1, 2):
        assert_same(state(tmp_path, member, "start"), start, f"member {member}'s initial LoRA")
    expected = local_run(reference, start, epochs_of({m: {0: 2, 1: 2, 2: 2} for m in range(3)}, reference.config.vocab_size))
    with exact_unless_a_round_came_back_partial(members):
        for epoch, local_state in enumerate(expected, start=1):
            for member in range(3):
                assert_same(state(tmp_path, member, epoch), local_state, f"member {member} after epoch {epoch}")
    assert (expected[-1]["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"] != 0).any()  # it trained
    # the loop closed: a peer hosts the trained adapter, and a client generates with it as local peft does
    (host,) = start_peers(tiny_llama, bootstrap, ["0:4"], "--adapters", f"collab={adapter}")
    try:
        model = AutoDistributedModelForCausalLM.from_pretrained(
            tiny_llama, initial_peers=[bootstrap], allowed_peers=(host.peer_id,), active_adapter="collab")
        try:
            prompt = member_batch(0, 0, 1, reference.config.vocab_size)
            swarm_tokens = model.generate(prompt, max_new_tokens=8, do_sample=False)
        finally:
            model.close()
    finally:
        host.process.stop()
    local = PeftModel.from_pretrained(copy.deepcopy(reference), str(adapter))
    assert_same(get_peft_model_state_dict(local), expected[-1], "the saved adapter read back by peft")
    assert torch.equal(swarm_tokens, local.generate(input_ids=prompt, max_new_tokens=8, do_sample=False))


def test_a_member_killed_mid_run_does_not_stop_the_others(members, reference, tmp_path):
    start_file = tmp_path / "go"
    survivors = [members(member, [2, 2, 2], 6, "with-a-death", start_file=start_file, hold=5) for member in range(2)]
    doomed = members(2, [2, 2, 2], 6, "with-a-death", start_file=start_file, hold=5, pause_at_epoch=1)
    wait_all([*survivors, doomed], r"joined run")
    start_file.touch()
    doomed.wait_for_line(r"pausing at epoch 1", timeout=RUN_TIMEOUT)
    doomed.stop(signal.SIGKILL)  # the machine dies: the process, its DHT node and its averagers
    killed_at = time.monotonic()
    finish(survivors)
    print(f"the survivors took {time.monotonic() - killed_at:.1f}s for the 2 epochs after the death")
    schedule = {0: {0: 2, 1: 2, 2: 2}, 1: {0: 2, 1: 2, 2: 2}, 2: {0: 2}}  # member 2 gave only epoch 0's batch
    expected = local_run(reference, state(tmp_path, 0, "start"), epochs_of(schedule, reference.config.vocab_size))
    with exact_unless_a_round_came_back_partial(members):
        for epoch, local_state in enumerate(expected, start=1):
            for member in range(2):
                assert_same(state(tmp_path, member, epoch), local_state, f"member {member} after epoch {epoch}")


def test_a_late_joiner_continues_from_the_current_state(members, reference, tmp_path):
    start_file = tmp_path / "go"
    # the target stays 6 samples: 3 rows from each of two members, then 2 from each of three
    early = [members(member, [3, 3, 2, 2], 6, "late-join", start_file=start_file) for member in range(2)]
    wait_all(early, r"joined run")
    start_file.touch()
    wait_all(early, r"epoch 2 loss")
    late = members(2, [2, 2], 6, "late-join", first_epoch=2)
    late.wait_for_line(r"downloaded the state of epoch 2", timeout=RUN_TIMEOUT)
    finish([*early, late])
    schedule = {0: {0: 3, 1: 3, 2: 2, 3: 2}, 1: {0: 3, 1: 3, 2: 2, 3: 2}, 2: {2: 2, 3: 2}}
    expected = local_run(reference, state(tmp_path, 0, "start"), epochs_of(schedule, reference.config.vocab_size))
    with exact_unless_a_round_came_back_partial(members):
        assert_same(state(tmp_path, 2, "start"), state(tmp_path, 0, 2), "the late joiner's state after joining")
        for epoch, local_state in enumerate(expected, start=1):
            for member in (0, 1) if epoch <= 2 else (0, 1, 2):
                assert_same(state(tmp_path, member, epoch), local_state, f"member {member} after epoch {epoch}")

