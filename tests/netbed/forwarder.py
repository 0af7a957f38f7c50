"""A TCP forwarder that can sit on a path between two hosts of the bed.

    python -m tests.netbed.forwarder --listen HOST:PORT --to HOST:PORT
        [--delay-ms D] [--flip-after N] [--capture FILE]

For each accepted connection it opens one to the target and pipes both
directions.  ``--delay-ms`` delays every chunk by D ms in each direction
(one-way delay): each chunk is timestamped on arrival and written at
arrival + D, so throughput is not limited to one chunk per D.
``--flip-after N`` XORs the byte at offset N (0-based) of the stream going to
the target with 0xFF, once per connection.  ``--capture FILE`` appends every
byte received from either side to FILE.  Once listening it prints one line,
``forwarding IP:PORT -> TARGET``.  SIGTERM makes it exit cleanly (status 0).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
import sys
from typing import BinaryIO

CHUNK = 64 * 1024
# Bytes a direction may hold in its delay queue before reading pauses.  High
# enough that a 50 ms delay still allows hundreds of MB/s.
MAX_QUEUED = 32 * 1024 * 1024
CONNECT_TIMEOUT = 10.0


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


def _nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def _pump(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    delay_s: float,
    flip_at: int | None,
    capture: BinaryIO | None,
) -> None:
    """Copy reader -> writer until EOF (or an error), each chunk delayed by delay_s."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    queued = 0
    room = asyncio.Event()
    room.set()

    async def read_side() -> None:
        nonlocal queued
        offset = 0
        try:
            while True:
                data = await reader.read(CHUNK)
                if not data:
                    break
                arrival = loop.time()
                if capture is not None:
                    capture.write(data)
                    capture.flush()
                if flip_at is not None and offset <= flip_at < offset + len(data):
                    changed = bytearray(data)
                    changed[flip_at - offset] ^= 0xFF
                    data = bytes(changed)
                offset += len(data)
                queued += len(data)
                queue.put_nowait((arrival + delay_s, data))
                while queued > MAX_QUEUED:
                    room.clear()
                    await room.wait()
        except (ConnectionError, OSError):
            pass
        finally:
            queue.put_nowait(None)

    reading = asyncio.create_task(read_side())
    try:
        while True:
            item = await queue.get()
            if item is None:
                break
            due, data = item
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            queued -= len(data)
            if queued <= MAX_QUEUED:
                room.set()
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        reading.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await reading


async def _close(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):
        writer.close()
        await asyncio.wait_for(writer.wait_closed(), 2)


async def serve(listen: str, target: str, delay_ms: float = 0.0, flip_after: int | None = None,
                capture: str | None = None) -> None:
    listen_host, listen_port = split_address(listen)
    target_host, target_port = split_address(target)
    delay_s = max(0.0, delay_ms) / 1000.0
    capture_file = open(capture, "ab") if capture else None
    handlers: set[asyncio.Task] = set()
    stop = asyncio.Event()

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        handlers.add(asyncio.current_task())
        try:
            try:
                target_r, target_w = await asyncio.wait_for(
                    asyncio.open_connection(target_host, target_port), CONNECT_TIMEOUT)
            except (OSError, asyncio.TimeoutError) as error:
                print(f"forwarder: cannot reach {target}: {error}", file=sys.stderr, flush=True)
                await _close(client_w)
                return
            _nodelay(client_w)
            _nodelay(target_w)
            pumps = {
                asyncio.create_task(_pump(client_r, target_w, delay_s, flip_after, capture_file)),
                asyncio.create_task(_pump(target_r, client_w, delay_s, None, capture_file)),
            }
            try:
                # Either side closing (after what it sent was delivered) closes both.
                _, pending = await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in pumps:
                    task.cancel()
                for task in pumps:
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
                await _close(target_w)
                await _close(client_w)
        finally:
            handlers.discard(asyncio.current_task())

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    server = await asyncio.start_server(handle, listen_host, listen_port)
    host, port = server.sockets[0].getsockname()[:2]
    print(f"forwarding {host}:{port} -> {target}", flush=True)
    try:
        await stop.wait()
    finally:
        server.close()
        for task in list(handlers):
            task.cancel()
        if handlers:
            await asyncio.wait(list(handlers), timeout=3)
        if capture_file is not None:
            capture_file.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.netbed.forwarder", description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True, help="HOST:PORT to listen on (port 0: any)")
    parser.add_argument("--to", required=True, help="HOST:PORT to forward to")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay added to every chunk")
    parser.add_argument("--flip-after", type=int, default=None, help="XOR byte N of each upstream stream with 0xFF")
    parser.add_argument("--capture", default=None, help="append every byte seen to this file")
    args = parser.parse_args(argv)
    asyncio.run(serve(args.listen, args.to, args.delay_ms, args.flip_after, args.capture))
    return 0


if __name__ == "__main__":
    sys.exit(main())
