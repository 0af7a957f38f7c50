"""A Swarm client run inside a test-bed host: generates (or runs forward/backward) and prints one JSON line.

    python -m tests.netbed.swarm_client MODEL --initial-peers MADDR [--allowed ID ...] [--prefer ID]
        [--prompt 1,2,3] [--new-tokens N] [--seed S] [--pause-after K] [--train OUT.pt]

--seed samples (seeded as local transformers would be), otherwise greedy. --pause-after K prints "paused" after
the K-th new token and waits for a line on stdin (the test kills a peer meanwhile). --prefer makes routing choose
that peer while it is up (so a test knows which peer a session starts on). --train saves the outputs of the remote
blocks for seeded hidden states and the gradient of their inputs to OUT.pt instead of generating.
"""

import argparse
import json
import os
import sys

import torch
from transformers.generation.streamers import BaseStreamer

from client import AutoDistributedModelForCausalLM


class PauseAfter(BaseStreamer):
    def __init__(self, tokens: int):
        self.tokens, self.seen = tokens, -1  # the first put() is the prompt

    def put(self, value) -> None:
        self.seen += 1
        if self.seen == self.tokens:
            print("paused", flush=True)
            sys.stdin.readline()

    def end(self) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--initial-peers", action="append", required=True)
    parser.add_argument("--allowed", action="append", default=[])
    parser.add_argument("--prefer")
    parser.add_argument("--prompt", default="5,6,7,8")
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--pause-after", type=int)
    parser.add_argument("--train")
    args = parser.parse_args()
    model = AutoDistributedModelForCausalLM.from_pretrained(
        args.model, initial_peers=args.initial_peers, allowed_peers=tuple(args.allowed)
    )
    try:
        view = model.remote.view
        if args.prefer:
            step_cost = view._step_cost
            view._step_cost = lambda span, *rest: step_cost(span, *rest) + (0.0 if span.peer_id == args.prefer else 10.0)
        if args.train:
            generator = torch.Generator().manual_seed(0)
            hidden = torch.randn(2, 6, model.config.hidden_size, generator=generator).requires_grad_()
            output = model.remote(hidden)
            weights = torch.randn(output.shape, generator=generator)
            (output * weights).sum().backward()
            torch.save({"output": output.detach(), "grad": hidden.grad}, args.train)
            print(json.dumps({"route": [hop.peer.peer_id for hop in view.chain(purpose="training")]}), flush=True)
            return
        inputs = torch.tensor([[int(token) for token in args.prompt.split(",")]])
        options = dict(max_new_tokens=args.new_tokens, do_sample=args.seed is not None)
        if args.seed is not None:
            torch.manual_seed(args.seed)
            options.update(top_k=20, temperature=0.9)
        if args.pause_after is not None:
            options["streamer"] = PauseAfter(args.pause_after)
        with model.inference_session(max_length=inputs.shape[1] + args.new_tokens) as session:
            tokens = model.generate(inputs, **options)
            route = [hop.peer.peer_id for hop in session.route]
        print(json.dumps({"tokens": tokens[0].tolist(), "route": route, "pushed_steps": session.pushed_steps}), flush=True)
    finally:
        model.close()


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)  # skip the interpreter's teardown of torch and transformers: seconds the test would wait for
