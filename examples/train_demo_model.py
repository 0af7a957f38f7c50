"""Trains the built-in demo model: a small byte-level Llama, on the docstrings of Python's standard library.

    python examples/train_demo_model.py [--minutes 5] [--out examples/demo_model]
    python examples/train_demo_model.py --minutes 4 --hidden-size 64 --layers 2 --heads 2 --kv-heads 1 \
        --out examples/demo_draft_model    # the small draft model of bench/speculative.py

The text is the PSF-licensed documentation that ships with Python itself, so no download is needed; a few CPU
minutes are enough for the model to write recognisable English words.
"""

import argparse
import importlib
import inspect
import math
import time
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from swarm.checkpoint_maker import byte_tokenizer, tiny_llama_config

MODULES = [
    "collections", "itertools", "functools", "json", "os", "pathlib", "re", "string", "textwrap", "random",
    "statistics", "datetime", "calendar", "heapq", "bisect", "shutil", "tempfile", "csv", "argparse", "logging",
    "threading", "queue", "asyncio", "socket", "subprocess", "urllib.parse", "email", "html", "http.client",
    "unittest", "doctest", "typing", "dataclasses", "enum", "contextlib", "abc", "io", "zipfile", "tarfile",
    "gzip", "hashlib", "base64", "struct", "copy", "pprint", "decimal", "fractions", "math", "sqlite3", "inspect",
]


def corpus(modules: list[str] = MODULES) -> str:
    """The docstrings (ASCII, over 80 characters) of `modules` and of their classes and functions, each once."""
    texts = []
    for name in modules:
        module = importlib.import_module(name)
        for obj in [module, *(value for _, value in inspect.getmembers(module) if inspect.isclass(value) or inspect.isfunction(value))]:
            doc = inspect.getdoc(obj)
            if doc and len(doc) > 80 and doc.isascii():
                texts.append(doc)
    return "\n\n".join(dict.fromkeys(texts))  # drop repeats, keep order


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "demo_model"))
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--intermediate-size", type=int, default=None, help="default: 2.75 x hidden size")
    args = parser.parse_args()

    torch.manual_seed(0)
    tokenizer = byte_tokenizer()
    data = torch.tensor(tokenizer(corpus()).input_ids)
    print(f"corpus: {len(data) / 1e6:.2f}M bytes of standard-library docstrings")
    config = tiny_llama_config(
        hidden_size=args.hidden_size, num_layers=args.layers, num_heads=args.heads, num_kv_heads=args.kv_heads,
        intermediate_size=args.intermediate_size or args.hidden_size * 11 // 4,
    )
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    batch, length = 16, 128
    deadline = time.monotonic() + args.minutes * 60
    step, started = 0, time.monotonic()
    while time.monotonic() < deadline:
        progress = (time.monotonic() - started) / (deadline - started)
        for group in optimizer.param_groups:
            group["lr"] = 3e-3 * min(1.0, step / 50) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        starts = torch.randint(0, len(data) - length - 1, (batch,))
        inputs = torch.stack([data[s : s + length] for s in starts])
        loss = model(inputs, labels=inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        if step % 100 == 0:
            print(f"step {step:5d}  loss {loss.item():.3f}", flush=True)
        step += 1
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    sample = model.generate(**tokenizer(["The function "], return_tensors="pt"), max_new_tokens=60, do_sample=False)
    print(f"saved to {args.out} after {step} steps; greedy sample: {tokenizer.decode(sample[0])!r}")


if __name__ == "__main__":
    main()
