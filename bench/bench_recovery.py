"""Time to recover when a peer dies mid-generation, with replicas ready.

    python -m bench.bench_recovery [--hidden 1024 --layers 8 --kill-at 32 --new-tokens 64 --repeats 3]

Two replicas of each half of the model; during a greedy generation a peer of the session's route is SIGKILLed
after --kill-at tokens. Prints the median time from the kill to the next token (failure noticed, replacement
opened, history replayed, step done) next to an ordinary step, and checks the tokens equal a fault-free run.
"""

import argparse
import signal
import statistics
import tempfile
import time

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from bench.common import add_model_arguments, even_spans, model_config
from client import AutoDistributedModelForCausalLM
from peer.local_swarm import start_bootstrap, start_peers
from swarm.checkpoint_maker import save_random_checkpoint


class StepClock(StoppingCriteria):
    """Timestamps every generated token; kills a peer of the route after `kill_at` tokens."""

    def __init__(self, model, peers: dict, kill_at: int):
        self.model, self.peers, self.kill_at = model, peers, kill_at
        self.stamps: list[float] = []
        self.killed_at: float | None = None

    def __call__(self, input_ids, scores, **kwargs):
        self.stamps.append(time.perf_counter())
        if len(self.stamps) == self.kill_at:
            victim = self.model._implicit_session.route[-1].peer.peer_id
            self.peers.pop(victim).process.stop(signal.SIGKILL)
            self.killed_at = time.perf_counter()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--kill-at", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    config = model_config(args)
    spans = even_spans(args.layers)
    recoveries, ordinary = [], []
    with tempfile.TemporaryDirectory() as folder:
        save_random_checkpoint(folder, config)
        node, bootstrap = start_bootstrap()
        peers = {}
        try:
            peers = {peer.peer_id: peer for peer in start_peers(folder, bootstrap, spans * 2, "--num-threads", "1")}
            model = AutoDistributedModelForCausalLM.from_pretrained(folder, initial_peers=[bootstrap], ban_seconds=600)
            prompt = torch.randint(3, config.vocab_size, (1, 16))
            options = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
            expected = model.generate(prompt, **options)
            for _ in range(args.repeats):
                clock = StepClock(model, peers, args.kill_at)
                same = torch.equal(model.generate(prompt, stopping_criteria=StoppingCriteriaList([clock]), **options), expected)
                assert same, "tokens differ from the fault-free run"
                recoveries.append(clock.stamps[args.kill_at] - clock.killed_at)
                ordinary.append(statistics.median(b - a for a, b in zip(clock.stamps, clock.stamps[1:])))
                for peer in start_peers(folder, bootstrap, [spans[1]], "--num-threads", "1"):  # replica back
                    peers[peer.peer_id] = peer
            model.close()
        finally:
            for peer in peers.values():
                peer.process.stop()
            node.stop()
    print(f"model: llama hidden {args.hidden}, {args.layers} layers, fp32; 2 replicas x 2 halves on loopback; "
          f"kill after {args.kill_at} of {args.new_tokens} tokens, median of {args.repeats}")
    print(f"ordinary step:              {statistics.median(ordinary) * 1e3:8.1f} ms")
    print(f"kill -> next token:         {statistics.median(recoveries) * 1e3:8.1f} ms  (tokens identical to the fault-free run)")


if __name__ == "__main__":
    main()
