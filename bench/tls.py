"""What TLS costs a decode step: round trips of step-sized messages on one gRPC bidirectional stream (what an
inference session is), over TLS with a pinned identity certificate and over plaintext, in turns, on loopback.

    python -m bench.tls [--steps 2000] [--repeats 5]
"""

import argparse
import asyncio
import statistics
import threading
import time

import grpc
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils.crypto import RSAPrivateKey

from bench.results import Result, table
from swarm.identity import identity_of
from swarm.net.endpoints import Endpoint, secure_channel, server_credentials
from swarm.net.tls import TLSIdentity

SIZES = {"decode step, hidden 1024 fp32": 4096, "decode step, hidden 8192 bf16": 16384}


async def _echo(requests, _context):
    async for request in requests:
        yield request


def _serve(tls: TLSIdentity, ready: threading.Event, ports: dict, stop: threading.Event) -> None:
    async def main() -> None:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
            "bench.Echo", {"Echo": grpc.stream_stream_rpc_method_handler(_echo)}
        )])
        ports["plain"] = server.add_insecure_port("127.0.0.1:0")
        ports["tls"] = server.add_secure_port("127.0.0.1:0", server_credentials(tls.certificate, tls.private_key_pem))
        await server.start()
        ready.set()
        while not stop.is_set():
            await asyncio.sleep(0.1)
        await server.stop(None)

    asyncio.run(main())


def _round_trips(channel: grpc.Channel, size: int, steps: int) -> float:
    """Median seconds per message round trip on one stream (after a warm-up tenth)."""
    outgoing: "list[bytes]" = []
    sent = threading.Semaphore(0)

    def requests():
        for _ in range(steps):
            sent.acquire()
            yield outgoing.pop()

    call = channel.stream_stream("/bench.Echo/Echo")(requests())
    payload = bytes(size)
    timings = []
    for _ in range(steps):
        started = time.perf_counter()
        outgoing.append(payload)
        sent.release()
        next(call)
        timings.append(time.perf_counter() - started)
    return statistics.median(timings[steps // 10 :])


def tls_cost(steps: int, repeats: int) -> list[Result]:
    key = RSAPrivateKey()
    tls = TLSIdentity(key, identity_of(RSASignatureValidator(key).local_public_key))
    ready, stop, ports = threading.Event(), threading.Event(), {}
    thread = threading.Thread(target=_serve, args=(tls, ready, ports, stop), daemon=True)
    thread.start()
    ready.wait(30)
    channels = {
        "plain": grpc.insecure_channel(f"127.0.0.1:{ports['plain']}"),
        "tls": secure_channel(Endpoint(tls.identity, tls.certificate, address=f"127.0.0.1:{ports['tls']}")),
    }
    results = []
    try:
        for name, size in SIZES.items():
            runs = {kind: [] for kind in channels}
            for _ in range(repeats):
                for kind, channel in channels.items():
                    runs[kind].append(_round_trips(channel, size, steps))
            plain, secure = statistics.median(runs["plain"]), statistics.median(runs["tls"])
            costs = sorted(tls_run - plain_run for tls_run, plain_run in zip(runs["tls"], runs["plain"]))
            results.append(Result(
                f"TLS cost per step, {name} ({size // 1024} KiB each way)", "ms", (secure - plain) * 1e3,
                higher_is_better=False,
                detail=f"round trip {secure * 1e3:.3f} ms with TLS vs {plain * 1e3:.3f} ms plaintext, "
                       f"median of {repeats} x {steps}; range {costs[0] * 1e3:.3f} to {costs[-1] * 1e3:.3f} ms",
            ))
    finally:
        for channel in channels.values():
            channel.close()
        stop.set()
        thread.join(10)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(table(tls_cost(args.steps, args.repeats)))


if __name__ == "__main__":
    main()
