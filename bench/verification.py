"""What checking peers' answers costs, and how soon a liar is caught.

    python -m bench.verification [--hidden 1024 --layers 8] [--repeats 5] [--new-tokens 64] [--sessions 16]
        [--parts cost,detection,trusted]

Two peers each serve every block (so every answer can be checked by the other); local `transformers` decodes the
same prompt in the same run. Figures: decode tokens/s with verification as by default (every call checked until a
peer has passed its probation, then spot checks: measured after the probation), with every call checked (what a peer
on probation costs) and off, for one session (`generate`) and for many sessions stepping at once from threads of one
client (each checked at its end, as `generate` does); then a peer that lies on 1 step in 20
(tests/liar_peer.py) against clients checking every `verify_every` steps: how many generations end with local's
tokens (all must), and how many wrong steps the liar answered before it was caught (what was computed again); then
a peer honest through its probation that lies afterwards, against default clients: how many calls came back wrong
(not drawn for a spot check) before one caught it, and whether each of them said it was unchecked.
"""

import argparse
import signal
import statistics
import sys
import tempfile
import threading
import time

import torch
from transformers import LlamaForCausalLM

from bench.common import add_model_arguments, interleaved_medians, interleaved_timings, model_config
from client import AutoDistributedModelForCausalLM
from peer.local_swarm import PeerHandle, spawn_cli, start_bootstrap, start_peers
from swarm.checkpoint_maker import save_random_checkpoint
from tests.test_verification import routed_first_to


def sessions_decode(model, prompts: torch.Tensor, new_tokens: int) -> float:
    """Seconds for every row of `prompts` to decode `new_tokens` tokens in a session of its own, each from a thread
    (feeding fixed tokens: the cost of the steps, not of the head), then checked as the model's settings say."""
    embed = model.get_input_embeddings()

    def run(row: torch.Tensor) -> None:
        with torch.inference_mode(), model.remote.inference_session(max_length=row.numel() + new_tokens) as session:
            session.step(embed(row[None]))
            for step in range(new_tokens):
                session.step(embed(row[step % row.numel()].reshape(1, 1)))
            session.verify()

    threads = [threading.Thread(target=run, args=(row,)) for row in prompts]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started


def cost(args, folder: str, local, bootstrap: str) -> None:
    """Three clients: the default (checks at every call until a peer has passed its probation, then spot checks),
    one checking every call (what a peer on probation costs), and one checking nothing. The default one gets
    through the peers' probation before anything is timed."""
    prompt = torch.randint(3, local.config.vocab_size, (1, 16))
    options = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
    clients = {
        "spot": AutoDistributedModelForCausalLM.from_pretrained(folder, initial_peers=[bootstrap]),
        "every": AutoDistributedModelForCausalLM.from_pretrained(folder, initial_peers=[bootstrap],
                                                                 spot_check_rate=1.0),
        "off": AutoDistributedModelForCausalLM.from_pretrained(folder, initial_peers=[bootstrap], verify=False),
    }
    try:
        default = clients["spot"]
        for _ in range(2 * default.remote.config.verify_probation):  # the probation of both (routes alternate)
            default.generate(prompt, **options)
        trusted = sum(default.remote.view.is_trusted(span.peer_id) for span in default.remote.view.peer_spans())
        runs = {"local": lambda: local.generate(prompt, **options)}
        runs.update({name: lambda model=model: model.generate(prompt, **options) for name, model in clients.items()})
        seconds = interleaved_medians(runs, args.repeats)
        checks = [default.generate(prompt, **options).verification.checks for _ in range(args.repeats * 4)]
        output = clients["every"].generate(prompt, **options)
        same = torch.equal(output, local.generate(prompt, **options))
        rate = {name: args.new_tokens / value for name, value in seconds.items()}
        print(f"| single session, {args.new_tokens} tokens | {rate['spot']:.1f} | {rate['every']:.1f} | "
              f"{rate['off']:.1f} | {rate['spot'] / rate['off']:.3f} | {rate['every'] / rate['off']:.3f} | "
              f"{rate['local']:.1f} | {trusted} peers trusted; {sum(checks)} checks in {len(checks)} calls; same "
              f"tokens as local: {same} |")
        prompts = torch.randint(3, local.config.vocab_size, (args.sessions, 8))
        for model in clients.values():  # warm-up
            sessions_decode(model, prompts, args.new_tokens)
        runs = {name: lambda model=model: sessions_decode(model, prompts, args.new_tokens)
                for name, model in clients.items()}
        timings = interleaved_timings(runs, args.repeats)
        tokens = args.sessions * args.new_tokens
        rate = {name: tokens / statistics.median(values) for name, values in timings.items()}
        spans = {name: f"({tokens / max(values):.1f}-{tokens / min(values):.1f})" for name, values in timings.items()}
        print(f"| {args.sessions} sessions, one client process | {rate['spot']:.1f} {spans['spot']} | "
              f"{rate['every']:.1f} {spans['every']} | {rate['off']:.1f} {spans['off']} | "
              f"{rate['spot'] / rate['off']:.3f} | {rate['every'] / rate['off']:.3f} | | |")
    finally:
        for model in clients.values():
            model.close()


def start_liar(args, folder: str, bootstrap: str, lie: dict[str, str]) -> PeerHandle:
    return PeerHandle.from_online_line(spawn_cli(
        "serve", folder, "--initial-peers", bootstrap, "--blocks", f"0:{args.layers}", "--num-threads", "1",
        module="tests.liar_peer", env=lie,
    ))


def detection(args, folder: str, local, bootstrap: str, honest: list[PeerHandle]) -> None:
    prompt = torch.randint(3, local.config.vocab_size, (1, 16))
    options = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
    expected = local.generate(prompt, **options)
    for every in args.verify_every:
        got_away, exact = [], 0
        for trial in range(args.liar_trials):
            lie = {"SWARM_TEST_LIE": "sometimes:20", "SWARM_TEST_LIE_SEED": str(trial)}
            liar = start_liar(args, folder, bootstrap, lie)
            model = AutoDistributedModelForCausalLM.from_pretrained(folder, initial_peers=[bootstrap], verify_every=every)
            try:
                routed_first_to(model, liar)  # every call goes to it until it is convicted
                for _ in range(args.generations):
                    output = model.generate(prompt, **options)
                    exact += torch.equal(output, expected)
                    got_away += [conviction.steps_got_away for conviction in output.verification.caught]
            finally:
                model.close()
                liar.process.stop()
        trials = args.liar_trials * args.generations
        steps = f"median {statistics.median(got_away)}, {min(got_away)}-{max(got_away)}" if got_away else "never caught"
        print(f"| verify_every={every or 'end only'} | {exact}/{trials} | {len(got_away)} of {args.liar_trials} | {steps} |")


def trusted_liar(args, folder: str, local, bootstrap: str) -> None:
    """A peer honest through its probation and two calls more, wrong on every step after, against a default
    client: the calls that came back wrong before a spot check caught it, and whether each said it was unchecked."""
    new_tokens = 16  # a call is 16 steps (the prompt's, then one a token)
    prompt = torch.randint(3, local.config.vocab_size, (1, 16))
    options = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    expected = local.generate(prompt, **options)
    wrong_calls, flagged = [], True
    for _ in range(args.liar_trials):
        model = AutoDistributedModelForCausalLM.from_pretrained(folder, initial_peers=[bootstrap])
        honest_steps = (model.remote.config.verify_probation + 2) * new_tokens
        liar = start_liar(args, folder, bootstrap, {"SWARM_TEST_LIE": f"after:{honest_steps}"})
        try:
            routed_first_to(model, liar)  # every call goes to it until it is convicted
            wrong = 0
            for _ in range(100):
                output = model.generate(prompt, **options)
                if output.verification.caught:
                    break
                if not torch.equal(output, expected):
                    wrong += 1
                    flagged &= not output.verification.checked
            wrong_calls.append(wrong)
        finally:
            model.close()
            liar.process.stop()
    print(f"| honest for its probation and 2 calls, then wrong at every step | {args.liar_trials} | median "
          f"{statistics.median(wrong_calls)}, {min(wrong_calls)}-{max(wrong_calls)} | {flagged} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--sessions", type=int, default=16)
    parser.add_argument("--verify-every", type=lambda text: [int(n) for n in text.split(",")], default=[0, 8, 32])
    parser.add_argument("--liar-trials", type=int, default=3)
    parser.add_argument("--generations", type=int, default=2)
    parser.add_argument("--parts", default="cost,detection,trusted", help="which tables to measure")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a stopped benchmark still stops the peers it started
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        save_random_checkpoint(folder, model_config(args))
        local = LlamaForCausalLM.from_pretrained(folder).eval().requires_grad_(False)
        node, bootstrap = start_bootstrap()
        honest = start_peers(folder, bootstrap, [f"0:{args.layers}"] * 2)
        try:
            if "cost" in parts:
                print("| decode | verification on (default: spot checks once trusted), tokens/s | every call checked "
                      "| off | default / off | every call / off | local transformers | |")
                print("|---|---:|---:|---:|---:|---:|---:|---|")
                cost(args, folder, local, bootstrap)
            if "detection" in parts:
                print("\n| a peer wrong on 1 step in 20 | generations with local's tokens | liars caught | wrong steps "
                      "before caught |")
                print("|---|---:|---:|---|")
                detection(args, folder, local, bootstrap, honest)
            if "trusted" in parts:
                print("\n| a trusted peer turning liar (default spot checks) | trials | calls with wrong tokens "
                      "before caught | each said unchecked |")
                print("|---|---:|---:|---|")
                trusted_liar(args, folder, local, bootstrap)
        finally:
            for peer in honest:
                peer.process.stop()
            node.stop()


if __name__ == "__main__":
    main()
