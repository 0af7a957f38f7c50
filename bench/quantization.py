"""Quantized peers (--quant none|int8|nf4): memory per block, decode speed and the demo model's perplexity per mode.

    python -m bench.quantization [--repeats 5] [--new-tokens 64] [--memory-limit 128MiB] [--cache-tokens 1024]

- memory: what one block's weights hold in each mode (their tensors' bytes) against bfloat16 (targets: int8 at most
  55%, nf4 at most 30%), and how many blocks `volunteer join` takes in --memory-limit in each mode (each block with
  --cache-tokens of KV cache);
- decode: single-session greedy decoding through one peer serving every block of the benchmark model in each mode,
  in interleaved rounds, against local `transformers` loaded with the same quantization, and against the unquantized
  peer (target: at least 0.8x);
- perplexity: the demo model on held-out text (docstrings of standard-library modules it was not trained on), with
  each mode computed as peers compute it (the same config and kernels; the tests show the swarm gives the same).
"""

import argparse
import os
import statistics
import tempfile

import torch

from bench.common import add_model_arguments, interleaved_timings, model_config, rates
from bench.results import Result, save_json, table
from client import AutoDistributedModelForCausalLM
from examples.train_demo_model import MODULES, corpus
from peer.local_swarm import start_bootstrap, start_peers
from peer.resources import blocks_that_fit, human_bytes
from peer.volunteer import parse_size
from swarm.blocks import BlockSpan
from swarm.checkpoint import Checkpoint
from swarm.checkpoint_maker import byte_tokenizer, save_random_checkpoint
from swarm.constants import QUANTIZATIONS
from swarm.quantization import local_reference, stored_bytes

DEMO_MODEL = os.path.join(os.path.dirname(__file__), "..", "examples", "demo_model")
HELD_OUT_MODULES = [
    "difflib", "configparser", "optparse", "pickle", "codecs", "locale", "gettext", "smtplib", "imaplib", "mailbox",
    "selectors", "sched", "graphlib", "ipaddress", "uuid", "secrets", "timeit", "wave", "fnmatch", "glob",
]
TARGET_SHARE = {"int8": 0.55, "nf4": 0.30}  # of a bfloat16 block's bytes
CORES = os.cpu_count() or 1


def memory(folder: str, budget: int, cache_tokens: int) -> list[Result]:
    checkpoint = Checkpoint(folder)
    bfloat16 = stored_bytes(BlockSpan.from_checkpoint(checkpoint, 0, 1, torch.bfloat16).layers[0])
    results = []
    for mode in QUANTIZATIONS:
        block = stored_bytes(BlockSpan.from_checkpoint(checkpoint, 0, 1, torch.float32, quantization=mode).layers[0])
        target = f" (target <= {TARGET_SHARE[mode]:.0%})" if mode in TARGET_SHARE else ""
        results.append(Result(f"one block's weights, {mode}", "MB", block / 1e6,
                              detail=f"{block / bfloat16:.1%} of bfloat16's {bfloat16 / 1e6:.1f} MB{target}"))
    for mode in QUANTIZATIONS:
        fit = blocks_that_fit(checkpoint, torch.float32, budget, cache_tokens, mode)
        results.append(Result(f"blocks volunteer join takes in {human_bytes(budget)}, {mode}", "blocks", fit,
                              detail=f"of {checkpoint.config.num_hidden_layers}, float32, {cache_tokens} tokens of KV "
                              "cache each"))
    return results


def decode(args: argparse.Namespace, folder: str) -> list[Result]:
    prompt = torch.randint(3, args.vocab, (1, 16), generator=torch.Generator().manual_seed(0))
    options = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
    node, bootstrap = start_bootstrap()
    peers = start_peers(folder, bootstrap, [f"0:{args.layers}"] * len(QUANTIZATIONS), "--num-threads", str(CORES),
                        options_per_span=[("--quant", mode) for mode in QUANTIZATIONS])
    clients = {}
    try:
        for mode, peer in zip(QUANTIZATIONS, peers):
            print(f"  peer {mode}: {peer.compute}", flush=True)
            clients[mode] = AutoDistributedModelForCausalLM.from_pretrained(
                folder, initial_peers=[bootstrap], allowed_peers=(peer.peer_id,)
            )
        locals_ = {mode: local_reference(folder, mode) for mode in QUANTIZATIONS}
        same = {mode: torch.equal(clients[mode].generate(prompt, **options), locals_[mode].generate(prompt, **options))
                for mode in QUANTIZATIONS}
        functions = {}
        for mode in QUANTIZATIONS:
            functions[f"peer {mode}"] = lambda mode=mode: clients[mode].generate(prompt, **options)
            functions[f"local {mode}"] = lambda mode=mode: locals_[mode].generate(prompt, **options)
        speeds = {name: rates(args.new_tokens, seconds) for name, seconds in interleaved_timings(functions, args.repeats).items()}
    finally:
        for client in clients.values():
            client.close()
        for peer in peers:
            peer.process.stop()
        node.stop()
    results = []
    for mode in QUANTIZATIONS:
        versus_exact = [mine / exact for mine, exact in zip(speeds[f"peer {mode}"], speeds["peer none"])]
        detail = f"one peer, every block, {args.new_tokens} new tokens, same tokens as local: {same[mode]}"
        if mode != "none":
            detail += (f"; against the unquantized peer {statistics.median(versus_exact):.2f}x "
                       f"({min(versus_exact):.2f}-{max(versus_exact):.2f}, target >= 0.8x)")
        results.append(Result.measured(f"decode, {mode} peer", "tokens/s", speeds[f"peer {mode}"], speeds[f"local {mode}"],
                                       detail=detail))
    return results


def perplexity() -> list[Result]:
    """The demo model on docstrings it was not trained on, per mode."""
    trained = set(corpus(MODULES).split("\n\n"))
    held_out = "\n\n".join(text for text in corpus(HELD_OUT_MODULES).split("\n\n") if text not in trained)
    ids = torch.tensor(byte_tokenizer()(held_out).input_ids)
    windows = ids[: len(ids) // 256 * 256].view(-1, 256)[:64]
    figures = {}
    for mode in QUANTIZATIONS:
        model = local_reference(DEMO_MODEL, mode)
        with torch.no_grad():
            losses = [model(input_ids=window[None], labels=window[None]).loss.item() for window in windows]
        figures[mode] = float(torch.tensor(losses).mean().exp())
    detail = f"{windows.numel():,} held-out bytes (docstrings of {len(HELD_OUT_MODULES)} unseen modules)"
    return [
        Result(f"demo model perplexity, {mode}", "", figures[mode],
               detail=detail if mode == "none" else f"{figures[mode] / figures['none'] - 1:+.2%} against full precision")
        for mode in QUANTIZATIONS
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--memory-limit", default="128MiB", help="for the blocks volunteer join takes")
    parser.add_argument("--cache-tokens", type=int, default=1024, help="of each block, for the blocks volunteer join takes")
    parser.add_argument("--json", default="bench/quantization.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        os.environ["SWARM_CACHE_DIR"] = os.path.join(folder, "cache")  # peers inherit it: calibrated afresh
        save_random_checkpoint(folder, model_config(args))
        results = memory(folder, parse_size(None, None, args.memory_limit), args.cache_tokens)
        results += perplexity()
        results += decode(args, folder)
    print(table(results))
    save_json(results, args.json)
    print(f"\nwritten to {args.json}")


if __name__ == "__main__":
    main()
