"""The benchmark suite: every figure against local `transformers` measured in the same run, medians of repeats.

    python -m bench [--quick] [--json bench/results.json] [--only decode,concurrent,prefill,training,overhead,startup]

Prints a markdown table (the one in the README) and writes the same figures as JSON.
"""

import argparse
import os
import tempfile
import time

from transformers import LlamaForCausalLM

from bench.common import add_model_arguments, even_spans, model_config
from bench.concurrency import concurrent_decode
from bench.decode import client_first_token, prefill, single_session_decode
from bench.overhead import hop_overhead
from bench.results import Result, save_json, table
from bench.training import forward_backward
from peer.local_swarm import start_bootstrap, start_peers
from swarm.checkpoint_maker import save_random_checkpoint

ALL = ("decode", "concurrent", "prefill", "training", "overhead", "startup")
CORES = os.cpu_count() or 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--quick", action="store_true", help="a smaller model and fewer repeats, to check the suite runs")
    parser.add_argument("--only", default=",".join(ALL), help=f"comma-separated subset of {','.join(ALL)}")
    parser.add_argument("--json", default="bench/results.json")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--sessions", type=lambda text: [int(n) for n in text.split(",")], default=[1, 4, 16, 64])
    parser.add_argument("--concurrent-tokens", type=int, default=32)
    parser.add_argument("--one-process-sessions", type=int, default=16, help="sessions run from one client process")
    parser.add_argument("--train-batch", type=int, default=4)
    parser.add_argument("--train-length", type=int, default=128)
    parser.add_argument("--hop-steps", type=int, default=500)
    args = parser.parse_args()
    if args.quick:
        args.hidden, args.layers, args.vocab, args.repeats = 256, 4, 1024, 2
        args.new_tokens, args.sessions, args.concurrent_tokens, args.hop_steps = 16, [1, 4], 8, 100
        args.one_process_sessions = 4
    wanted = set(args.only.split(","))
    peer_settings: list[str] = []
    results = run(args, wanted, peer_settings)
    print(table(results, peer_settings))
    save_json(results, args.json, peer_settings)
    print(f"\nwritten to {args.json}")


def run(args: argparse.Namespace, wanted: set[str], peer_settings: list[str]) -> list[Result]:
    """The benchmarks in `wanted`; what each peer chose when it started goes to `peer_settings`."""
    results: list[Result] = []
    with tempfile.TemporaryDirectory() as folder:
        os.environ["SWARM_CACHE_DIR"] = os.path.join(folder, "cache")  # peers inherit it: calibrated afresh
        save_random_checkpoint(folder, model_config(args))
        local = LlamaForCausalLM.from_pretrained(folder).eval()
        params = sum(parameter.numel() for parameter in local.parameters()) / 1e6
        print(f"model: random Llama, {params:.0f}M parameters (hidden {args.hidden}, {args.layers} layers, "
              f"vocab {args.vocab}), fp32; peers and client on this machine, loopback", flush=True)
        node, bootstrap = start_bootstrap()
        try:
            # Peers may use every core; each measures at its first start (in a cache of this run's own) from which
            # pass size a second thread pays (peer/calibration.py).
            if wanted & {"decode", "startup", "prefill", "training"}:
                with _peers(folder, bootstrap, even_spans(args.layers), CORES, peer_settings) as started:
                    if "decode" in wanted:
                        results.extend(map(_logged, single_session_decode(args, folder, local, bootstrap)))
                    if "startup" in wanted:
                        results.append(_logged(Result(
                            "peer start-up to online, first start", "s", started, higher_is_better=False,
                            detail=f"2 peers together: load {args.layers // 2} blocks, calibrate, announce",
                        )))
                        with _peers(folder, bootstrap, even_spans(args.layers)[:1], CORES, []) as restarted:
                            results.append(_logged(Result(
                                "peer start-up to online, restart", "s", restarted, higher_is_better=False,
                                detail="the same setting again: calibration cached",
                            )))
                        results.append(_logged(Result.measured(
                            "client time to first token", "s", client_first_token(folder, bootstrap, args.repeats),
                            higher_is_better=False, detail=f"from_pretrained + route + 1 token, {args.repeats} clients",
                        )))
                    if "prefill" in wanted:
                        results.append(_logged(prefill(args, folder, local, bootstrap)))
                    if "training" in wanted:
                        results.append(_logged(forward_backward(args, folder, local, bootstrap)))
            if "concurrent" in wanted:
                with _peers(folder, bootstrap, [f"0:{args.layers}"], CORES, peer_settings):
                    results.extend(map(_logged, concurrent_decode(args, folder, local, bootstrap)))
            if "overhead" in wanted:
                results.append(_logged(hop_overhead(bootstrap, args.hop_steps)))
        finally:
            node.stop()
    return results


class _peers:
    """Peers for the spans, started together; entering gives the seconds until the last was online, and adds what
    each chose to `settings`."""

    def __init__(self, folder: str, bootstrap: str, spans: list[str], threads: int, settings: list[str]):
        self.arguments = (folder, bootstrap, spans, "--num-threads", str(threads))
        self.spans, self.settings = spans, settings

    def __enter__(self) -> float:
        started = time.perf_counter()
        self.handles = start_peers(*self.arguments)
        seconds = time.perf_counter() - started
        for span, handle in zip(self.spans, self.handles):
            self.settings.append(f"{span}: {handle.compute}")
            print(f"  peer {span} chose: {handle.compute}", flush=True)
        return seconds

    def __exit__(self, *exc_info) -> None:
        for handle in self.handles:
            handle.process.stop()


def _logged(result: Result) -> Result:
    ratio = "" if result.ratio is None else f" ({result.ratio:.2f}x local)"
    print(f"  {result.metric}: {result.swarm:.4g} {result.unit}{ratio}", flush=True)
    return result


if __name__ == "__main__":
    main()
