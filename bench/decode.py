"""Single-session decoding and a 512-token prefill through 2 peers x half the blocks, against local transformers."""

import argparse
import contextlib
from collections.abc import Iterator

import torch

from bench.common import interleaved_timings, rates, timed
from bench.results import Result
from client import AutoDistributedModelForCausalLM


def single_session_decode(args: argparse.Namespace, folder: str, local, bootstrap: str) -> list[Result]:
    """Peers pushing each step on to the next one (the default), and the client relaying every hop, in turns."""
    prompt = torch.randint(3, local.config.vocab_size, (1, 16))
    options = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
    with _client(folder, bootstrap) as pushed, _client(folder, bootstrap, peer_to_peer=False) as relayed:
        seconds = interleaved_timings(
            {
                "local": lambda: local.generate(prompt, **options),
                "pushed": lambda: pushed.generate(prompt, **options),
                "relayed": lambda: relayed.generate(prompt, **options),
            },
            args.repeats,
        )
        expected = local.generate(prompt, **options)
        same = torch.equal(pushed.generate(prompt, **options), expected) and torch.equal(relayed.generate(prompt, **options), expected)
    detail = f"2 peers x {args.layers // 2} blocks, {args.new_tokens} new tokens, same tokens: {same}"
    speeds = {name: rates(args.new_tokens, values) for name, values in seconds.items()}
    return [
        Result.measured("single-session decode", "tokens/s", speeds["pushed"], speeds["local"], detail=detail),
        Result.measured(
            "single-session decode, client relays each hop", "tokens/s", speeds["relayed"], speeds["local"],
            detail="peer_to_peer=False: each peer's output goes back to the client",
        ),
    ]


def prefill(args: argparse.Namespace, folder: str, local, bootstrap: str) -> Result:
    """The time to the first new token of a long prompt (a one-token generate)."""
    prompt = torch.randint(3, local.config.vocab_size, (1, args.prefill_tokens))
    options = dict(max_new_tokens=1, do_sample=False)
    with _client(folder, bootstrap) as swarm:
        seconds = interleaved_timings(
            {"local": lambda: local.generate(prompt, **options), "swarm": lambda: swarm.generate(prompt, **options)},
            args.repeats,
        )
    return Result.measured(
        f"prefill of a {args.prefill_tokens}-token prompt", "ms", [value * 1e3 for value in seconds["swarm"]],
        [value * 1e3 for value in seconds["local"]], higher_is_better=False,
        detail="time to the first new token, 2 peers",
    )


@contextlib.contextmanager
def _client(folder: str, bootstrap: str, **config) -> Iterator:
    model = AutoDistributedModelForCausalLM.from_pretrained(folder, initial_peers=[bootstrap], **config)
    try:
        yield model
    finally:
        model.close()


def client_first_token(folder: str, bootstrap: str, repeats: int) -> list[float]:
    """Seconds from a new client (from_pretrained) to its first generated token, for each of `repeats` clients
    (one after another, each closed before the next)."""
    prompt = torch.tensor([[5, 6, 7]])

    def first_token() -> None:
        model = AutoDistributedModelForCausalLM.from_pretrained(folder, initial_peers=[bootstrap])
        model.generate(prompt, max_new_tokens=1, do_sample=False)
        model.close()

    return [timed(first_token) for _ in range(repeats)]
