"""Batched passes on the peer: every session gets what it gets alone, whatever it is batched with."""

import asyncio
import threading

import torch

from client import AutoDistributedModelForCausalLM
from peer.batching import run_pass
from peer.kv_pages import PagedKV
from peer.runtime import ComputeRuntime
from peer.sessions import InferenceSessionState, StepWork
from peer.threads import ThreadPlan
from swarm.blocks import BlockSpan
from swarm.checkpoint import Checkpoint
from swarm.wire import swarm_peer_pb2 as pb
from swarm.wire import swarm_peer_pb2_grpc as pb_grpc

SPANS = {"all": "0:4"}

PAGE_SIZE = 4  # small pages, so that rows span many of them


class Scenario:
    """Sessions with their own prompts, driven step by step either alone or all together."""

    def __init__(self, reference, kv: PagedKV):
        self.reference, self.kv = reference, kv
        self.next_page = 0

    def open(self, name: str, batch_size: int, max_length: int) -> InferenceSessionState:
        pages_per_row = -(-max_length // PAGE_SIZE)
        pages = list(range(self.next_page, self.next_page + batch_size * pages_per_row))
        self.next_page += len(pages)
        return InferenceSessionState(name, 0, 0, 4, batch_size, max_length, pages)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.reference.lm_head(self.reference.model.norm(hidden))


def _step(session: InferenceSessionState, tokens: torch.Tensor, embed, mask: torch.Tensor | None = None) -> StepWork:
    batch, length = tokens.shape
    positions = torch.arange(session.position, session.position + length).expand(batch, length)
    mask = torch.ones(batch, length, dtype=torch.bool) if mask is None else mask
    return StepWork(session, embed(tokens), positions, mask)


def test_batched_decoding_matches_each_session_alone(tiny_llama, reference):
    """Prompts of different lengths (one batch-2 session with a padded row), per-session sampling seeds,
    a session joining halfway and one leaving: each session's logits equal its logits alone within 1e-4."""
    span = BlockSpan.from_checkpoint(Checkpoint(tiny_llama), 0, 4, torch.float32)
    embed = reference.get_input_embeddings()
    prompts = {
        "short": torch.tensor([[5, 6, 7]]),
        "padded-pair": torch.tensor([[0, 0, 9, 10, 11, 12, 13], [20, 21, 22, 23, 24, 25, 26]]),
        "late": torch.tensor([[30, 31, 32, 33, 34]]),
    }
    masks = {"padded-pair": torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)}
    joins, leaves, steps = {"short": 0, "padded-pair": 0, "late": 4}, {"short": 7, "padded-pair": 12, "late": 12}, 12

    def drive(together: bool) -> dict[str, list[torch.Tensor]]:
        scenario = Scenario(reference, PagedKV(4, num_pages=64, page_size=PAGE_SIZE))
        sessions, tokens, logits = {}, {}, {name: [] for name in prompts}
        generators = {name: torch.Generator().manual_seed(index) for index, name in enumerate(prompts)}
        for step in range(steps):
            works = {}
            for name, prompt in prompts.items():
                if joins[name] == step:
                    sessions[name] = scenario.open(name, prompt.shape[0], max_length=32)
                    works[name] = _step(sessions[name], prompt, embed, masks.get(name))
                elif joins[name] < step < leaves[name]:
                    works[name] = _step(sessions[name], tokens[name], embed)
            groups: dict[int, list[StepWork]] = {}
            for name, work in works.items():
                groups.setdefault(work.hidden_states.shape[1] if together else id(work), []).append(work)
            for group in groups.values():
                run_pass(span, scenario.kv, group, group[0].hidden_states.shape[1])
            for name, work in works.items():
                step_logits = scenario.logits(work.output()[:, -1])
                logits[name].append(step_logits)
                probabilities = torch.softmax(step_logits.double(), dim=-1)
                tokens[name] = torch.multinomial(probabilities, 1, generator=generators[name])
        return logits

    alone, together = drive(together=False), drive(together=True)
    for name in prompts:
        assert len(alone[name]) == len(together[name]) > 3
        for step_alone, step_together in zip(alone[name], together[name]):
            torch.testing.assert_close(step_together, step_alone, rtol=0, atol=1e-4)


def test_batched_pass_matches_local_transformers(tiny_llama, reference):
    """A batched decode pass over sessions at different positions gives local `transformers`' logits."""
    span = BlockSpan.from_checkpoint(Checkpoint(tiny_llama), 0, 4, torch.float32)
    embed = reference.get_input_embeddings()
    scenario = Scenario(reference, PagedKV(4, num_pages=32, page_size=PAGE_SIZE))
    sequences = [torch.arange(3, 3 + length)[None] for length in (2, 6, 11)]
    sessions = [scenario.open(f"s{index}", 1, 16) for index in range(len(sequences))]
    for session, sequence in zip(sessions, sequences):
        run_pass(span, scenario.kv, [_step(session, sequence[:, :-1], embed)], sequence.shape[1] - 1)
    works = [_step(session, sequence[:, -1:], embed) for session, sequence in zip(sessions, sequences)]
    run_pass(span, scenario.kv, works, 1)
    for work, sequence in zip(works, sequences):
        expected = reference(sequence).logits[:, -1]
        torch.testing.assert_close(scenario.logits(work.output()[:, -1]), expected, rtol=0, atol=1e-4)


def test_runtime_runs_a_lone_session_inline_and_batches_sessions_on_its_thread(tiny_llama, reference):
    """The only session's step runs on the caller's thread (nothing to batch it with); steps of several sessions
    run on the compute thread; every session gets the same output."""
    span = BlockSpan.from_checkpoint(Checkpoint(tiny_llama), 0, 4, torch.float32)
    ran_on_caller: list[bool] = []
    span.register_forward_hook(lambda *_: ran_on_caller.append(threading.current_thread() is threading.main_thread()))
    embed = reference.get_input_embeddings()
    scenario = Scenario(reference, PagedKV(4, num_pages=32, page_size=PAGE_SIZE))
    runtime = ComputeRuntime(span, scenario.kv)
    prompt = torch.tensor([[5, 6, 7, 8]])

    async def drive() -> tuple[torch.Tensor, list[torch.Tensor]]:
        lone = await runtime.submit_step(_step(scenario.open("lone", 1, 16), prompt, embed), only_session=True)
        together = [runtime.submit_step(_step(scenario.open(name, 1, 16), prompt, embed)) for name in ("a", "b", "c")]
        return lone, await asyncio.gather(*together)

    try:
        lone, together = asyncio.run(drive())
    finally:
        runtime.shutdown()
    assert ran_on_caller[0] and len(ran_on_caller) > 1 and not any(ran_on_caller[1:])
    for output in together:
        torch.testing.assert_close(output, lone, rtol=0, atol=1e-4)


def test_runtime_computes_small_passes_on_one_thread_and_large_ones_on_its_budget(tiny_llama, reference):
    """A decode step of one row runs on one thread; a prefill and a step of 8 rows on the plan's budget, set on
    whichever thread computes (OpenMP keeps the setting per thread): the caller's (inline) or the runtime's."""
    span = BlockSpan.from_checkpoint(Checkpoint(tiny_llama), 0, 4, torch.float32)
    threads_seen: list[int] = []
    span.register_forward_hook(lambda *_: threads_seen.append(torch.get_num_threads()))
    embed = reference.get_input_embeddings()
    scenario = Scenario(reference, PagedKV(4, num_pages=64, page_size=PAGE_SIZE))
    runtime = ComputeRuntime(span, scenario.kv, ThreadPlan(3, parallel_min_rows=8))

    async def drive() -> None:
        lone = scenario.open("lone", 1, 16)
        await runtime.submit_step(_step(lone, torch.arange(3, 13)[None], embed), only_session=True)
        await runtime.submit_step(_step(lone, torch.tensor([[5]]), embed), only_session=True)
        wide = scenario.open("wide", 8, 16)
        await runtime.submit_step(_step(wide, torch.full((8, 1), 7), embed))
        await runtime.submit_step(_step(lone, torch.tensor([[6]]), embed))

    try:
        asyncio.run(drive())
    finally:
        runtime.shutdown()
    assert threads_seen == [3, 1, 3, 1]


def test_concurrent_clients_get_their_own_tokens(peers, bootstrap, tiny_llama, reference, connect):
    """Clients generating at once on one peer (which batches their steps) each get local `transformers`' tokens."""
    prompts = [torch.arange(3, 3 + length)[None] for length in (3, 8, 5, 12, 6, 9)]
    models = [
        AutoDistributedModelForCausalLM.from_pretrained(tiny_llama, initial_peers=[bootstrap], allowed_peers=(peers["all"].peer_id,))
        for _ in prompts
    ]
    results: dict[int, torch.Tensor] = {}
    start = threading.Barrier(len(prompts))

    def generate(index: int) -> None:
        start.wait(timeout=60)
        results[index] = models[index].generate(prompts[index], max_new_tokens=24, do_sample=False)

    threads = [threading.Thread(target=generate, args=(index,)) for index in range(len(prompts))]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    finally:
        for model in models:
            model.close()
    for index, prompt in enumerate(prompts):
        assert torch.equal(results[index], reference.generate(prompt, max_new_tokens=24, do_sample=False))
    with connect(peers["all"]) as channel:
        assert pb_grpc.SwarmPeerStub(channel).Info(pb.InfoRequest(), timeout=10).largest_batch >= 2
