"""Swarm over a simulated wide-area network, against local transformers measured in the same run (needs root).

    python -m bench.wan [--quick] [--delay-ms 20] [--mbit 100] [--new-tokens 32] [--repeats 5] [--json FILE]
        [--peers 2,4] [--compression-mbit 10 (0: skip)] [--skip-nat]

Hosts are network namespaces (tests/netbed): a bootstrap node, one host per peer, a client host, and a home host
behind a NAT router. Every host's egress is capped at --mbit (tc tbf). This kernel has no netem, so the delay comes
from a delaying TCP forwarder on each peer's host in front of its data plane: the peer announces the forwarder's
port, so the client and a peer pushing to it both pay --delay-ms per direction (the DHT/libp2p traffic is not
delayed). A decode step pushed from peer to peer then crosses hops + 1 delays, one relayed by the client 2 x hops.

1. single-session decode through 2 and 4 peers, pushed (peer_to_peer=True) and client-relayed (False), with the
   "limit" per token: local compute per token + the delays a step must cross;
2. a peer behind NAT serving through the bootstrap node's relay against a direct one (no added delay there);
3. activation compression (ClientConfig.compression, if the client has it) on --compression-mbit links, 2 peers
   with the delay: decode and a --prefill-tokens prefill, wire bytes (what the forwarders saw, both directions,
   TLS included) and the largest logit error against local.

The measuring client runs inside the client host (`python -m bench.wan --client SPEC`, driven over its stdin);
local transformers runs in this process. Repeats run in turns (after a warm-up each); medians [min-max].
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench.common import add_model_arguments, model_config
from bench.results import Result, save_json, table

REPO_ROOT = Path(__file__).resolve().parents[1]
PEER_PORT, FORWARDER_PORT = 40000, 40001  # the same on every host: each is its own namespace
PEER_HOSTS = ("a", "b", "c", "d")
REPLY = "WAN "
CLIENT_TIMEOUT = 300.0


# ---------------------------------------------------------------------------------------------------------------
# The measuring client (runs inside a bed host)
# ---------------------------------------------------------------------------------------------------------------

def client_main(spec: dict) -> None:
    """Builds one model per entry of spec["models"], then answers one JSON request per stdin line."""
    from client import AutoDistributedModelForCausalLM

    torch.set_num_threads(1)  # the machine's cores are the peers'
    models = {}
    try:
        for name, options in spec["models"].items():
            options = dict(options)
            options["allowed_peers"] = tuple(options.get("allowed_peers", ()))
            models[name] = AutoDistributedModelForCausalLM.from_pretrained(
                spec["folder"], initial_peers=spec["initial_peers"], **options)
        _reply({"ready": True})
        for line in sys.stdin:
            request = json.loads(line)
            if request["op"] == "quit":
                break
            try:
                _reply(_generate(models[request["model"]], request))
            except Exception as error:  # noqa: BLE001 - the orchestrator reports it
                _reply({"error": f"{type(error).__name__}: {error}"})
    finally:
        for model in models.values():
            with contextlib.suppress(Exception):
                model.close()


def _generate(model, request: dict) -> dict:
    """One greedy generation; request["options"] adds generate options (prompt_lookup_num_tokens=...) and
    request["draft_layers"] a local draft model: the checkpoint's first blocks with its head (early exit), or
    request["draft_model"] the path of a separate small model."""
    from transformers import StoppingCriteriaList

    batch = isinstance(request["prompt"][0], list)  # several prompts of one length
    prompt = torch.tensor(request["prompt"] if batch else [request["prompt"]])
    options = dict(max_new_tokens=request["new_tokens"], min_new_tokens=request["new_tokens"], do_sample=False)
    options.update(request.get("options", {}))
    if request.get("draft_layers"):
        options["assistant_model"] = draft_model(model.config._name_or_path, request["draft_layers"])
    elif request.get("draft_model"):
        options["assistant_model"] = draft_model(request["draft_model"])
    if request.get("logits"):
        options.update(output_logits=True, return_dict_in_generate=True)
    steps = StepCounter()
    started = time.perf_counter()
    output = model.generate(prompt, stopping_criteria=StoppingCriteriaList([steps]), **options)
    seconds = time.perf_counter() - started
    if request.get("logits"):
        torch.save(torch.stack(output.logits).squeeze(1), request["logits"])
        output = output.sequences
    # the swarm model's report of a speculative call (a speculating batch checks its stopping criteria once a token,
    # not once a step)
    speculation = getattr(model, "last_speculation", None)
    tokens = output[:, prompt.shape[1]:] if batch else output[0, prompt.shape[1]:]
    result = {"seconds": seconds, "tokens": tokens.tolist(), "steps": steps.calls}
    if speculation is not None:
        result.update(steps=speculation.steps, draft_lengths=speculation.asked, drafted=sum(speculation.drafted),
                      accepted=sum(speculation.accepted))
    return result


class StepCounter:
    """A stopping criterion that never stops: generate calls it once per step through the model."""

    def __init__(self):
        self.calls = 0

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        self.calls += 1
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


@functools.cache
def draft_model(path: str, layers: int | None = None):
    """A draft for assisted generation: the checkpoint at `path`, or only its first `layers` blocks with its head (an
    early-exit draft of the swarm's own model, no second model needed)."""
    from transformers import AutoModelForCausalLM

    options = {} if layers is None else {"num_hidden_layers": layers}
    return AutoModelForCausalLM.from_pretrained(path, **options).eval()


def _reply(message: dict) -> None:
    print(REPLY + json.dumps(message), flush=True)


class Client:
    """The client process in a bed host; `generate` sends it one request and waits for the answer."""

    def __init__(self, host, folder: str, initial_peer: str, models: dict[str, dict], log: Path):
        spec = {"folder": folder, "initial_peers": [initial_peer], "models": models}
        self.log = log
        self.stderr = open(log, "wb")
        env = dict(os.environ, PYTHONUNBUFFERED="1", TQDM_DISABLE="1")
        self.process = host.popen([sys.executable, "-m", "bench.wan", "--client", json.dumps(spec)], cwd=REPO_ROOT,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, env=env)
        self.buffer = b""
        try:
            self._read()
        except BaseException:
            self.close()
            raise

    def generate(self, model: str, prompt: list[int] | list[list[int]], new_tokens: int, logits: str | None = None, **extra) -> dict:
        request = {"op": "generate", "model": model, "prompt": prompt, "new_tokens": new_tokens, "logits": logits,
                   **extra}
        self.process.stdin.write((json.dumps(request) + "\n").encode())
        self.process.stdin.flush()
        answer = self._read()
        if "error" in answer:
            raise RuntimeError(f"client ({model}): {answer['error']}")
        return answer

    def _read(self) -> dict:
        deadline = time.monotonic() + CLIENT_TIMEOUT
        fd = self.process.stdout.fileno()
        while True:
            while b"\n" in self.buffer:
                line, self.buffer = self.buffer.split(b"\n", 1)
                text = line.decode(errors="replace")
                if text.startswith(REPLY):
                    return json.loads(text[len(REPLY):])
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"the client did not answer within {CLIENT_TIMEOUT}s; see {self.log}")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise RuntimeError(f"the client exited ({self.process.poll()}): {self._tail()}")
                self.buffer += chunk

    def _tail(self) -> str:
        self.stderr.flush()
        return self.log.read_text(errors="replace")[-3000:]

    def close(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(Exception):
                self.process.stdin.write(b'{"op": "quit"}\n')
                self.process.stdin.flush()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.stderr.close()


# ---------------------------------------------------------------------------------------------------------------
# The orchestrator (root namespace)
# ---------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Timings:
    seconds: list[float]
    bytes: list[int]
    tokens: list[int]
    steps: int = 0  # steps through the model in the last run (fewer than tokens when speculating)
    draft_lengths: list[int] = dataclasses.field(default_factory=list)  # asked for, per step, in the last run
    drafted: int = 0  # draft tokens of the last run
    accepted: int = 0  # of which the steps kept

    @property
    def acceptance(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    def span(self, scale: float = 1.0, digits: int = 1) -> str:
        return f"{min(self.seconds) * scale:.{digits}f}-{max(self.seconds) * scale:.{digits}f}"


def turns(functions: dict[str, Callable[[], dict]], repeats: int) -> dict[str, Timings]:
    """Each function once to warm up, then `repeats` rounds in turns (as bench.common.interleaved_medians), keeping
    every run's seconds, wire bytes and tokens (a function returns them, measured where it ran)."""
    for function in functions.values():
        function()
    runs = {name: Timings([], [], []) for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            result = function()
            runs[name].seconds.append(result["seconds"])
            runs[name].bytes.append(result.get("bytes", 0))
            runs[name].tokens = result["tokens"]
            runs[name].steps = result.get("steps", 0)
            runs[name].draft_lengths = result.get("draft_lengths", [])
            runs[name].drafted, runs[name].accepted = result.get("drafted", 0), result.get("accepted", 0)
    return runs


class Wire:
    """Bytes the delaying forwarders have seen (their capture files), to count what one request moved."""

    def __init__(self, captures: list[Path]):
        self.captures = captures

    def total(self) -> int:
        return sum(path.stat().st_size for path in self.captures if path.exists())

    def measured(self, function: Callable[[], dict]) -> dict:
        before = self.total()
        result = function()
        return dict(result, bytes=self.total() - before)


class Bench:
    def __init__(self, args: argparse.Namespace, bed, folder: str, local, work: Path):
        self.args, self.bed, self.folder, self.local, self.work = args, bed, folder, local, work
        self.processes = []
        self.forwarders: list[subprocess.Popen] = []
        self.results: list[Result] = []
        self.limits: list[str] = []

    def start(self) -> None:
        """The bootstrap node (which also relays for the peer behind NAT) and the forwarders."""
        from peer.local_swarm import start_bootstrap
        from tests.netbed import start_forwarder

        args, bed, work, local = self.args, self.bed, self.work, self.local
        node, self.initial_peer = start_bootstrap(launcher=bed["boot"].command)
        self.processes.append(node)
        captures = []
        for name in PEER_HOSTS:  # a delaying forwarder in front of each peer host's data plane
            host = bed[name]
            capture = work / f"wire-{name}.bin"
            process, _ = start_forwarder(host, f"{host.ip}:{PEER_PORT}", delay_ms=args.delay_ms,
                                         capture=str(capture), listen_port=FORWARDER_PORT)
            self.forwarders.append(process)
            captures.append(capture)
        self.wire = Wire(captures)
        generator = torch.Generator().manual_seed(0)
        vocab = local.config.vocab_size
        self.prompt = torch.randint(3, vocab, (16,), generator=generator).tolist()
        self.long_prompt = torch.randint(3, vocab, (args.prefill_tokens,), generator=generator).tolist()

    # -- processes --------------------------------------------------------------------------------------------

    def serve(self, host: str, blocks: str, *extra: str):
        from peer.local_swarm import PeerHandle, spawn_cli

        process = spawn_cli(
            "serve", self.folder, "--initial-peers", self.initial_peer, "--blocks", blocks,
            "--announce-period", "5", "--num-threads", "1", *extra, launcher=self.bed[host].command,
        )
        self.processes.append(process)
        return PeerHandle.from_online_line(process)

    def delayed_peers(self, count: int) -> list:
        """`count` peers, one per host, splitting the blocks; each reached through its host's delaying forwarder."""
        layers = self.args.layers
        bounds = [layers * index // count for index in range(count + 1)]
        processes = []
        from peer.local_swarm import PeerHandle, spawn_cli

        for index, name in enumerate(PEER_HOSTS[:count]):  # start together, then wait for each
            host = self.bed[name]
            process = spawn_cli(
                "serve", self.folder, "--initial-peers", self.initial_peer,
                "--blocks", f"{bounds[index]}:{bounds[index + 1]}", "--announce-period", "5", "--num-threads", "1",
                "--port", str(PEER_PORT), "--announce-host", host.ip, "--announce-port", str(FORWARDER_PORT),
                "--no-relay", launcher=host.command,
            )
            self.processes.append(process)
            processes.append(process)
        return [PeerHandle.from_online_line(process) for process in processes]

    def stop_peers(self, handles: list) -> None:
        for handle in handles:
            handle.process.stop()
            self.processes.remove(handle.process)

    def client(self, models: dict[str, dict], name: str) -> Client:
        return Client(self.bed["client"], self.folder, self.initial_peer, models, self.work / f"client-{name}.log")

    def limit_all(self, mbit: float) -> None:
        hosts = [self.bed[name] for name in [*self.bed.public_names, *self.bed.home_names]]
        for host in [*hosts, self.bed.router]:
            host.limit_bandwidth(mbit)

    def close(self) -> None:
        from tests.netbed import stop_forwarder

        for process in reversed(self.processes):
            with contextlib.suppress(Exception):
                process.stop()
        for forwarder in self.forwarders:
            stop_forwarder(forwarder)

    # -- local transformers -------------------------------------------------------------------------------------

    def local_run(self, prompt: list[int], new_tokens: int) -> dict:
        inputs = torch.tensor([prompt])
        options = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        started = time.perf_counter()
        with torch.inference_mode():
            output = self.local.generate(inputs, **options)
        return {"seconds": time.perf_counter() - started, "tokens": output[0, len(prompt):].tolist()}

    def local_logits(self, prompt: list[int], new_tokens: int) -> tuple[torch.Tensor, list[int]]:
        options = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       output_logits=True, return_dict_in_generate=True)
        with torch.inference_mode():
            output = self.local.generate(torch.tensor([prompt]), **options)
        return torch.stack(output.logits).squeeze(1), output.sequences[0, len(prompt):].tolist()

    # -- 1. decode through delayed peers ------------------------------------------------------------------------

    def decode(self, count: int) -> None:
        args, new = self.args, self.args.new_tokens
        print(f"[{count} peers, {args.delay_ms:g} ms one way, {args.mbit:g} Mbit/s] starting peers", flush=True)
        handles = self.delayed_peers(count)
        allowed = [handle.peer_id for handle in handles]
        client = self.client({"pushed": {"allowed_peers": allowed, "peer_to_peer": True},
                              "relayed": {"allowed_peers": allowed, "peer_to_peer": False}}, f"decode{count}")
        try:
            runs = turns({
                "local": lambda: self.local_run(self.prompt, new),
                "pushed": lambda: self.wire.measured(lambda: client.generate("pushed", self.prompt, new)),
                "relayed": lambda: self.wire.measured(lambda: client.generate("relayed", self.prompt, new)),
            }, args.repeats)
            self._decode_results(count, runs)
            if count == 2 and self.args.compression_mbit:
                self.compression(client_allowed=allowed)
        finally:
            client.close()
            self.stop_peers(handles)

    def _decode_results(self, count: int, runs: dict[str, Timings]) -> None:
        args, new = self.args, self.args.new_tokens
        compute_ms = runs["local"].median / new * 1e3
        delay = args.delay_ms
        for mode, crossings, label in (("pushed", count + 1, "peers push"), ("relayed", 2 * count, "client relays")):
            timing = runs[mode]
            ms = timing.median / new * 1e3
            limit = compute_ms + crossings * delay
            same = timing.tokens == runs["local"].tokens
            wire = statistics.median(timing.bytes) / new
            self.results.append(_logged(Result(
                f"WAN decode, {count} peers, {label}", "tokens/s", new / timing.median, new / runs["local"].median,
                detail=(f"{ms:.1f} ms/token [{timing.span(1e3 / new)}], limit {limit:.1f} ms "
                        f"(compute {compute_ms:.1f} + {crossings} x {delay:g} ms), measured/limit {ms / limit:.2f}, "
                        f"{wire / 1e3:.1f} kB/token on the wire, same tokens: {same}"),
            )))
            self.limits.append(f"| {count} peers, {label} | {new / timing.median:.2f} | {ms:.1f} [{timing.span(1e3 / new)}] "
                               f"| {compute_ms:.1f} | {limit:.1f} = {compute_ms:.1f} + {crossings} x {delay:g} "
                               f"| {ms / limit:.2f} | {same} |")

    # -- 3. compression ---------------------------------------------------------------------------------------

    def compression(self, client_allowed: list[str]) -> None:
        args, new = self.args, self.args.new_tokens
        modes = compression_modes()
        if modes is None:
            print("  compression: client.config.ClientConfig has no `compression` field; skipped", flush=True)
            self.results.append(Result("WAN compression", "", float("nan"), detail="skipped: no ClientConfig.compression"))
            return
        print(f"[compression, 2 peers, {args.delay_ms:g} ms, {args.compression_mbit:g} Mbit/s] modes {modes}", flush=True)
        self.limit_all(args.compression_mbit)
        client = self.client({mode: {"allowed_peers": client_allowed, "compression": mode} for mode in modes},
                             "compression")
        try:
            functions = {"local decode": lambda: self.local_run(self.prompt, new),
                         "local prefill": lambda: self.local_run(self.long_prompt, 1)}
            for mode in modes:
                functions[f"{mode} decode"] = lambda mode=mode: self.wire.measured(
                    lambda: client.generate(mode, self.prompt, new))
                functions[f"{mode} prefill"] = lambda mode=mode: self.wire.measured(
                    lambda: client.generate(mode, self.long_prompt, 1))
            runs = turns(functions, max(2, args.repeats - 2))
            local_decode, local_tokens = self.local_logits(self.prompt, new)
            local_prefill, _ = self.local_logits(self.long_prompt, 1)
            for mode in modes:
                decode_file, prefill_file = self.work / f"{mode}-decode.pt", self.work / f"{mode}-prefill.pt"
                tokens = client.generate(mode, self.prompt, new, logits=str(decode_file))["tokens"]
                client.generate(mode, self.long_prompt, 1, logits=str(prefill_file))
                agree = next((i for i, (a, b) in enumerate(zip(tokens, local_tokens)) if a != b), new)
                comparable = min(agree + 1, new)  # a step's logits are comparable while the tokens before agree
                decode_error = (torch.load(decode_file)[:comparable] - local_decode[:comparable]).abs().max().item()
                prefill_error = (torch.load(prefill_file) - local_prefill).abs().max().item()
                decode, prefill = runs[f"{mode} decode"], runs[f"{mode} prefill"]
                self.results.append(_logged(Result(
                    f"WAN decode, compression {mode}", "ms/token", decode.median / new * 1e3,
                    runs["local decode"].median / new * 1e3, higher_is_better=False,
                    detail=(f"[{decode.span(1e3 / new)}], {statistics.median(decode.bytes) / new / 1e3:.2f} kB/token on "
                            f"the wire, max |logit - local| {decode_error:.2e} (over {comparable} steps), "
                            f"{agree}/{new} tokens as local"),
                )))
                self.results.append(_logged(Result(
                    f"WAN {args.prefill_tokens}-token prefill, compression {mode}", "ms", prefill.median * 1e3,
                    runs["local prefill"].median * 1e3, higher_is_better=False,
                    detail=(f"[{prefill.span(1e3, 0)}], {statistics.median(prefill.bytes) / 1e3:.1f} kB on the wire, "
                            f"max |logit - local| {prefill_error:.2e}"),
                )))
        finally:
            client.close()
            self.limit_all(args.mbit)

    # -- 2. a peer behind NAT ----------------------------------------------------------------------------------

    def nat(self) -> None:
        args, new = self.args, self.args.new_tokens
        print(f"[NAT: one peer with every block, relayed by the bootstrap node vs direct; {args.mbit:g} Mbit/s, "
              f"no added delay] starting peers", flush=True)
        blocks = f"0:{args.layers}"
        direct = self.serve("e", blocks, "--no-relay")
        relayed = self.serve("home", blocks)
        print(f"  reachability: direct peer {direct.reachability}, home peer {relayed.reachability} "
              f"({relayed.address})", flush=True)
        client = self.client({"direct": {"allowed_peers": [direct.peer_id]},
                              "relayed": {"allowed_peers": [relayed.peer_id]}}, "nat")
        try:
            runs = turns({
                "local": lambda: self.local_run(self.prompt, new),
                "direct": lambda: client.generate("direct", self.prompt, new),
                "relayed": lambda: client.generate("relayed", self.prompt, new),
            }, args.repeats)
        finally:
            client.close()
            self.stop_peers([direct, relayed])
        for mode, label in (("direct", "direct peer"), ("relayed", f"peer behind NAT ({relayed.reachability})")):
            timing = runs[mode]
            extra = ""
            if mode == "relayed":
                extra = f", {timing.median / runs['direct'].median:.2f}x the direct peer's time"
            self.results.append(_logged(Result(
                f"WAN decode, 1 peer, {label}", "tokens/s", new / timing.median, new / runs["local"].median,
                detail=(f"{timing.median / new * 1e3:.1f} ms/token [{timing.span(1e3 / new)}]{extra}, "
                        f"no added delay, same tokens: {timing.tokens == runs['local'].tokens}"),
            )))


def compression_modes() -> list[str] | None:
    from client.config import ClientConfig

    if "compression" not in {field.name for field in dataclasses.fields(ClientConfig)}:
        return None
    try:
        from swarm.net.compression import CODECS
    except ImportError:
        CODECS = ("float16", "bfloat16", "uniform8")
    return ["none", *CODECS]


def _logged(result: Result) -> Result:
    ratio = "" if result.ratio is None else f" ({result.ratio:.2f}x local)"
    print(f"  {result.metric}: {result.swarm:.4g} {result.unit}{ratio}; {result.detail}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.wan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.set_defaults(hidden=512)
    parser.add_argument("--quick", action="store_true", help="a tiny model and few repeats, to check it runs")
    parser.add_argument("--delay-ms", type=float, default=20.0, help="one-way delay into each peer host")
    parser.add_argument("--mbit", type=float, default=100.0, help="every host's egress")
    parser.add_argument("--compression-mbit", type=float, default=10.0, help="links of the compression runs (0: skip)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prefill-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--peers", default="2,4", help="peer counts of the decode runs")
    parser.add_argument("--skip-nat", action="store_true")
    parser.add_argument("--json", default="", help="also write the figures here")
    parser.add_argument("--client", help=argparse.SUPPRESS)
    args = parser.parse_args()
    # SIGTERM (e.g. `timeout`) unwinds like an exception, so that every process is stopped and the bed removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.client:
        client_main(json.loads(args.client))
        return
    if args.quick:
        args.hidden, args.layers, args.vocab, args.repeats, args.new_tokens, args.prefill_tokens = 256, 4, 1024, 2, 8, 32
    from tests.netbed import NetBed, available

    reason = available()
    if reason is not None:
        print(f"no network test bed here ({reason}); nothing measured")
        return
    from transformers import LlamaForCausalLM

    from swarm.checkpoint_maker import save_random_checkpoint

    counts = [int(n) for n in args.peers.split(",") if n]
    if any(n > len(PEER_HOSTS) or args.layers % n for n in counts):
        parser.error(f"--peers must divide --layers and be at most {len(PEER_HOSTS)}")
    # Local transformers on one thread, as each peer computes a decode step (and, with --num-threads 1, a prefill):
    # on this 2-core machine two threads competing with the bed's processes run several times slower.
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        save_random_checkpoint(folder, model_config(args))
        local = LlamaForCausalLM.from_pretrained(folder).eval()
        params = sum(parameter.numel() for parameter in local.parameters()) / 1e6
        print(f"model: random Llama, {params:.0f}M parameters (hidden {args.hidden}, {args.layers} layers, vocab "
              f"{args.vocab}), fp32, local transformers on 1 thread; {args.new_tokens} new tokens after a 16-token prompt, greedy; {args.repeats} "
              f"repeats in turns", flush=True)
        with NetBed(public=["boot", *PEER_HOSTS, "e", "client"], home=["home"]) as bed:
            bench = Bench(args, bed, folder, local, Path(folder))
            try:
                bench.start()
                bench.limit_all(args.mbit)
                for count in counts:
                    bench.decode(count)
                if not args.skip_nat:
                    bench.nat()
            finally:
                bench.close()
        results = bench.results
        print()
        print(table(results))
        if not bench.limits:
            return
        print()
        print(f"Limits per token ({args.delay_ms:g} ms one way into each peer host, {args.mbit:g} Mbit/s; local "
              f"compute = local transformers' ms/token in this run):")
        print()
        print("| case | tokens/s | ms/token [min-max] | local ms/token | limit ms/token | measured/limit | same tokens |")
        print("|---|---:|---:|---:|---:|---:|---|")
        print("\n".join(bench.limits))
        if args.json:
            save_json(results, args.json)
            print(f"\nwritten to {args.json}")


if __name__ == "__main__":
    main()
