"""The OpenAI-compatible server under load: concurrent streaming chat requests, against local `transformers`.

    python -m bench.api [--hidden 1024 --layers 8] [--requests 16] [--new-tokens 32] [--repeats 3] [--peers 1]

A bootstrap node, `--peers` peers splitting the blocks, and `swarm-peer api` run on this machine; `--requests`
different chat messages are sent at once as streaming, greedy chat completions (the end of sequence banned, so each
makes exactly `--new-tokens` tokens) from one asyncio `openai` client. Figures: aggregate tokens/s over the whole burst against
local `transformers` generating the same templated prompts as one left-padded batch (greedy), and each request's time
to its first streamed token, median and p95. The model's vocabulary is the byte tokenizer's (259), so that every
token decodes.
"""

import argparse
import asyncio
import os
import signal
import statistics
import sys
import tempfile
import time

import openai
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from bench.common import add_model_arguments, even_spans, model_config, timed
from peer.local_swarm import spawn_cli, start_bootstrap, start_peers
from swarm.checkpoint_maker import save_random_checkpoint

CORES = os.cpu_count() or 1
EOS = 2  # the byte tokenizer's </s>
TOPICS = ["rivers", "bread", "stars", "chess", "rain", "bees", "trains", "salt", "maps", "glass", "owls", "tea",
          "bridges", "clocks", "moss", "kites"]


async def burst(url: str, messages: list[list[dict]], new_tokens: int) -> tuple[float, list[float], list[str]]:
    """Sends every conversation at once; returns the burst's seconds, each request's seconds to its first token,
    and the texts."""
    client = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
    started = time.perf_counter()

    async def ask(conversation: list[dict]) -> tuple[float, str]:
        stream = await client.chat.completions.create(
            model="bench", messages=conversation, max_tokens=new_tokens, temperature=0, stream=True,
            logit_bias={EOS: -100}, extra_body={"ignore_eos": True},  # as local's min_new_tokens: never the end
        )
        first, text = None, ""
        async for chunk in stream:
            for choice in chunk.choices:
                if choice.delta.content:
                    first = first or time.perf_counter() - started
                    text += choice.delta.content
        return first, text

    answers = await asyncio.gather(*(ask(conversation) for conversation in messages))
    seconds = time.perf_counter() - started
    await client.close()
    return seconds, [first for first, _ in answers], [text for _, text in answers]


def local_batch(local, tokenizer, messages: list[list[dict]], new_tokens: int) -> tuple[float, list[str]]:
    batch = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, padding=True,
                                          return_tensors="pt")
    options = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        output = None

        def run() -> None:
            nonlocal output
            output = local.generate(**batch, **options)

        seconds = timed(run)
    length = batch["input_ids"].shape[1]
    return seconds, [tokenizer.decode(row[length:], skip_special_tokens=True) for row in output]  # the texts


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20)[-1] if len(values) > 1 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.set_defaults(vocab=259)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peers", type=int, default=1)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a stopped benchmark still stops what it started
    messages = [[{"role": "user", "content": f"Tell me about {TOPICS[index % len(TOPICS)]}."}]
                for index in range(args.requests)]
    with tempfile.TemporaryDirectory() as folder:
        save_random_checkpoint(folder, model_config(args))
        local = LlamaForCausalLM.from_pretrained(folder).eval().requires_grad_(False)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        node, bootstrap = start_bootstrap()
        peers, server = [], None
        try:
            # Peers may use every core and measure how they compute (in a cache of this run's own), as in `bench`.
            os.environ["SWARM_CACHE_DIR"] = os.path.join(folder, "cache")
            peers = start_peers(folder, bootstrap, even_spans(args.layers, args.peers), "--num-threads", str(CORES))
            for peer in peers:
                print(f"peer from block {peer.start_block}: {peer.compute}", flush=True)
            server = spawn_cli("api", folder, "--initial-peers", bootstrap, "--port", "0", "--model-name", "bench")
            url = server.wait_for_line(r"serving \S+ at (http://\S+/v1)").group(1)
            asyncio.run(burst(url, messages[:2], 4))  # warm-up: routes measured, connections open
            local_batch(local, tokenizer, messages[:2], 4)
            swarm_seconds, local_seconds, firsts, same = [], [], [], True
            # Padding changes a batch's float rounding, so the texts are checked against each prompt generated alone.
            expected = [local_batch(local, tokenizer, [conversation], args.new_tokens)[1][0] for conversation in messages]
            for _ in range(args.repeats):
                seconds, first, texts = asyncio.run(burst(url, messages, args.new_tokens))
                swarm_seconds.append(seconds)
                local_seconds.append(local_batch(local, tokenizer, messages, args.new_tokens)[0])
                firsts += first
                same = same and texts == expected
            tokens = args.requests * args.new_tokens
            rate, local_rate = tokens / statistics.median(swarm_seconds), tokens / statistics.median(local_seconds)
            print(f"| {args.requests} streaming chat requests x {args.new_tokens} tokens, {args.peers} peer(s) | "
                  f"{rate:.1f} ({tokens / max(swarm_seconds):.1f}-{tokens / min(swarm_seconds):.1f}) tokens/s | "
                  f"{local_rate:.1f} ({tokens / max(local_seconds):.1f}-{tokens / min(local_seconds):.1f}) | "
                  f"{rate / local_rate:.2f}x | first token median {statistics.median(firsts) * 1000:.0f} ms, "
                  f"p95 {p95(firsts) * 1000:.0f} ms | texts equal local's: {same} |")
        finally:
            if server is not None:
                server.stop()
            for peer in peers:
                peer.process.stop()
            node.stop()


if __name__ == "__main__":
    main()
