"""Speculative decoding through the swarm on the multi-host bed, against local transformers in the same run (root).

    python -m bench.speculative [--delay-ms 20] [--mbit 100] [--new-tokens 48] [--repeats 3] [--peers 2,4]
        [--lookup 4] [--draft-layers 1] [--json FILE]

The model is the built-in demo model (examples/demo_model: trained, so drafts can be right; 4 blocks). Hosts,
bandwidth caps and the delaying forwarders are bench.wan's: a step pushed from peer to peer crosses hops + 1 delays.
For 2 and 4 peers, greedy decoding of the same prompt: plain, prompt lookup (draft tokens from the text so far), an
early-exit draft (the model's first --draft-layers blocks and head, held by the client) and a separate small draft
model (examples/demo_draft_model, held by the client); each draft with transformers' own lengths (prompt lookup
--lookup tokens, an assistant's heuristic schedule) and with the swarm's adaptive ones (client/speculation.py); and a
batch of --batch different prompts, plain and with the small-model draft (client/batched_speculation.py).
Figures: tokens/s, ms/token against the round-trip floor ((hops + 1) x delay per step, divided by the tokens a step
brings), tokens per step (1 + accepted draft tokens), the acceptance rate (draft tokens kept of those drafted), and
whether the tokens equal local transformers'.
--delay-ms 0 gives the same on the bed without delay (a loopback-like figure).
"""

from __future__ import annotations

import argparse
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import StoppingCriteriaList

from bench.results import Result, save_json, table
from bench.wan import PEER_HOSTS, Bench, StepCounter, draft_model, turns

DEMO_MODEL = Path(__file__).resolve().parents[1] / "examples" / "demo_model"
SMALL_DRAFT = DEMO_MODEL.with_name("demo_draft_model")  # 2 blocks of hidden size 64, trained on the same text
PROMPT = "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):\n"


def modes(args, drafts: dict, prompt: list[int], batch: list[list[int]]) -> dict[str, tuple[list, dict, dict]]:
    """mode -> (its prompt or prompts, the swarm client's request, local transformers' generate options).
    transformers' own draft lengths ("fixed": prompt lookup's --lookup, the assistant's heuristic) and the swarm's
    adaptive ones (prompt lookup up to --lookup-longest, an assistant up to client.speculation.MAX_ASSISTANT_TOKENS);
    local runs use transformers' own. A batch is verified in one step per round of drafts (greedy, fixed lengths;
    transformers' assisted generation takes one sequence, so its local figure is plain batched decoding)."""
    lookup, longest = {"prompt_lookup_num_tokens": args.lookup}, {"prompt_lookup_num_tokens": args.lookup_longest}
    early, small = {"draft_layers": args.draft_layers}, {"draft_model": str(SMALL_DRAFT)}
    by_mode = {"plain": (prompt, {}, {})}
    for name, request, local in (("prompt lookup", {}, lookup), ("early-exit draft", early, drafts["early-exit"]),
                                 ("small-model draft", small, drafts["small-model"])):
        local = local if isinstance(local, dict) else {"assistant_model": local}
        by_mode[name] = (prompt, {**request, "options": {**(lookup if not request else {}), "draft_length": "fixed"}},
                         local)
        by_mode[f"{name}, adaptive"] = (prompt, {**request, "options": {**(longest if not request else {}),
                                                                       "draft_length": "adaptive"}},
                                        {**local, **(longest if not request else {})})
    rows = f"batch of {len(batch)}"
    by_mode[f"plain, {rows}"] = (batch, {}, {})
    by_mode[f"small-model draft, {rows}"] = (batch, {**small, "options": {"draft_length": "fixed"}}, {})
    return by_mode


def batch_prompts(tokenizer, rows: int) -> list[list[int]]:
    """`rows` different code prompts cut to one length (so that no row needs padding)."""
    prompts = [tokenizer(PROMPT.replace("mul", name))["input_ids"] for name in ("mul", "div", "mod", "pow", "max")]
    length = min(len(ids) for ids in prompts[:rows])
    return [ids[:length] for ids in prompts[:rows]]


def local_run(local, options: dict, prompt: list, new_tokens: int) -> dict:
    batch = torch.tensor(prompt if isinstance(prompt[0], list) else [prompt])
    steps = StepCounter()
    started = time.perf_counter()
    with torch.inference_mode():
        output = local.generate(batch, stopping_criteria=StoppingCriteriaList([steps]), max_new_tokens=new_tokens,
                                min_new_tokens=new_tokens, do_sample=False, **options)
    tokens = output[:, batch.shape[1]:] if isinstance(prompt[0], list) else output[0, batch.shape[1]:]
    return {"seconds": time.perf_counter() - started, "tokens": tokens.tolist(), "steps": steps.calls}


def speculation(bench: Bench, args, drafts: dict, prompts: tuple[list[int], list[list[int]]], count: int,
                lines: list[str]) -> None:
    new = args.new_tokens
    print(f"[{count} peers, {args.delay_ms:g} ms one way, {args.mbit:g} Mbit/s] starting peers", flush=True)
    handles = bench.delayed_peers(count)
    client = bench.client({"swarm": {"allowed_peers": [h.peer_id for h in handles], "peer_to_peer": True}},
                          f"speculative{count}")
    by_mode = modes(args, drafts, *prompts)
    try:
        functions = {}
        for mode, (prompt, request, options) in by_mode.items():
            functions[f"local {mode}"] = lambda prompt=prompt, options=options: local_run(bench.local, options,
                                                                                          prompt, new)
            functions[mode] = lambda prompt=prompt, request=request: client.generate("swarm", prompt, new, **request)
        runs = turns(functions, args.repeats)
    finally:
        client.close()
        bench.stop_peers(handles)
    for mode, (prompt, _, _) in by_mode.items():
        rows = len(prompt) if isinstance(prompt[0], list) else 1
        plain = "plain" if rows == 1 else f"plain, batch of {rows}"
        timing, local = runs[mode], runs[f"local {mode}"]
        ms = timing.median / (new * rows) * 1e3
        plain_ms = runs[plain].median / (new * rows) * 1e3
        per_step = new / max(timing.steps, 1)
        floor = (count + 1) * args.delay_ms / per_step / rows
        same = timing.tokens == runs[f"local {plain}"].tokens
        lengths = f"{statistics.median(timing.draft_lengths):g}" if timing.draft_lengths else "-"
        acceptance = "-" if timing.acceptance is None else f"{timing.acceptance:.0%} of {timing.drafted}"
        span = timing.span(1e3 / (new * rows))
        bench.results.append(Result(
            f"speculative, {count} peers, {mode}", "tokens/s", new * rows / timing.median, new * rows / local.median,
            detail=f"{ms:.1f} ms/token [{span}], {per_step:.2f} tokens/step a row, draft length asked (median) "
                   f"{lengths}, draft tokens accepted {acceptance}, round-trip floor {floor:.1f} ms/token, "
                   f"{plain_ms / ms:.2f}x plain swarm decode, same tokens: {same}",
        ))
        print(f"  {bench.results[-1].metric}: {bench.results[-1].detail}", flush=True)
        lines.append(f"| {count} | {mode} | {new * rows / timing.median:.2f} | {ms:.1f} [{span}] | {per_step:.2f} | "
                     f"{lengths} | {acceptance} | {floor:.1f} | {plain_ms / ms:.2f}x | "
                     f"{local.median / (new * rows) * 1e3:.1f} | {same} |")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.speculative", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--delay-ms", type=float, default=20.0, help="one-way delay into each peer host")
    parser.add_argument("--mbit", type=float, default=100.0, help="every host's egress")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peers", default="2,4", help="peer counts (dividing the demo model's 4 blocks)")
    parser.add_argument("--lookup", type=int, default=4, help="prompt lookup's draft tokens")
    parser.add_argument("--lookup-longest", type=int, default=16, help="prompt lookup's longest adaptive draft")
    parser.add_argument("--draft-layers", type=int, default=1, help="blocks of the early-exit draft")
    parser.add_argument("--batch", type=int, default=4, help="rows of the batched runs (up to 5)")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    from tests.netbed import NetBed, available

    reason = available()
    if reason is not None:
        print(f"no network test bed here ({reason}); nothing measured")
        return
    from transformers import AutoModelForCausalLM, AutoTokenizer

    args.layers, args.prefill_tokens, args.compression_mbit = 4, 0, 0  # what bench.wan's Bench reads
    torch.set_num_threads(1)  # as each peer computes
    with tempfile.TemporaryDirectory() as folder:
        for file in DEMO_MODEL.iterdir():
            shutil.copy(file, folder)
        local = AutoModelForCausalLM.from_pretrained(folder).eval()
        drafts = {"early-exit": draft_model(folder, args.draft_layers), "small-model": draft_model(str(SMALL_DRAFT))}
        tokenizer = AutoTokenizer.from_pretrained(folder)
        prompt, batch = tokenizer(PROMPT)["input_ids"], batch_prompts(tokenizer, args.batch)
        print(f"demo model, {len(prompt)}-token prompt, {args.new_tokens} new tokens greedy, lookup {args.lookup}, "
              f"draft {args.draft_layers} block(s); {args.repeats} repeats in turns", flush=True)
        lines: list[str] = []
        with NetBed(public=["boot", *PEER_HOSTS, "e", "client"], home=["home"]) as bed:
            bench = Bench(args, bed, folder, local, Path(folder))
            try:
                bench.start()
                bench.limit_all(args.mbit)
                for count in [int(n) for n in args.peers.split(",") if n]:
                    speculation(bench, args, drafts, (prompt, batch), count, lines)
            finally:
                bench.close()
    print()
    print(table(bench.results))
    print(f"\n{args.delay_ms:g} ms one way into each peer host, {args.mbit:g} Mbit/s:\n")
    print("| peers | mode | tokens/s | ms/token [min-max] | tokens/step | draft length asked | accepted | "
          "round-trip floor ms/token | vs plain | local ms/token | same tokens |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    print("\n".join(lines))
    if args.json:
        save_json(bench.results, args.json)


if __name__ == "__main__":
    main()
