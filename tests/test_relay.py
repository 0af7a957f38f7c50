"""The relay for peers behind NAT, in one process on loopback: tunnels carry bytes both ways, a peer proves its
identity to register, bad handshakes are refused without harm, and a peer whose relay dies moves to another."""

import asyncio
import base64

from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils.crypto import RSAPrivateKey

from swarm.identity import identity_of
from swarm.net.relay import RelayListener, RelayServer

TIMEOUT = 10


def identity(key: RSAPrivateKey) -> str:
    return identity_of(RSASignatureValidator(key).local_public_key)


async def echo_server() -> tuple[asyncio.base_events.Server, int]:
    async def echo(reader, writer):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def connect_through(relay_port: int, target: str) -> tuple[bytes, asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", relay_port)
    writer.write(f"CONNECT {target}:443 HTTP/1.1\r\nHost: {target}:443\r\n\r\n".encode())
    status = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    return status.split(b"\r\n")[0], reader, writer


async def round_trip(relay_port: int, target: str, payload: bytes) -> bytes:
    status, reader, writer = await connect_through(relay_port, target)
    assert status == b"HTTP/1.1 200 Connection established", status
    writer.write(payload)
    echoed = await asyncio.wait_for(reader.readexactly(len(payload)), TIMEOUT)
    writer.close()
    return echoed


def test_tunnels_through_the_relay_and_moving_to_another_when_it_dies():
    async def scenario():
        first, second = RelayServer(), RelayServer()
        first_port, second_port = await first.start("127.0.0.1", 0), await second.start("127.0.0.1", 0)
        local, local_port = await echo_server()
        key = RSAPrivateKey()
        moved = []

        async def choose(failed: str) -> str:
            return f"127.0.0.1:{second_port}"

        listener = RelayListener(f"127.0.0.1:{first_port}", key, local_port, choose_relay=choose, on_move=moved.append)
        listener.FAILURES_BEFORE_MOVING = 1
        task = asyncio.create_task(listener.run())
        try:
            await asyncio.wait_for(listener.registered.wait(), TIMEOUT)
            assert first.registered == [identity(key)]
            payload = bytes(range(256)) * 4096  # 1 MiB: no cap on a tunnel's data
            assert await round_trip(first_port, identity(key), payload) == payload
            status, _, writer = await connect_through(first_port, "sw" + "0" * 40)
            assert status == b"HTTP/1.1 404 Not Found"
            writer.close()

            await first.stop()
            for _ in range(100):  # bounded: the listener notices, fails once, and moves
                if listener.registered.is_set() and listener.relay.endswith(str(second_port)):
                    break
                await asyncio.sleep(0.1)
            assert moved == [f"127.0.0.1:{second_port}"]
            assert await round_trip(second_port, identity(key), b"still here") == b"still here"
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await listener.close()
            await second.stop()
            local.close()

    asyncio.run(scenario())


def test_bad_handshakes_are_refused_and_the_relay_keeps_serving():
    async def scenario():
        relay = RelayServer()
        port = await relay.start("127.0.0.1", 0)
        local, local_port = await echo_server()
        key, impostor = RSAPrivateKey(), RSAPrivateKey()
        listener = RelayListener(f"127.0.0.1:{port}", key, local_port)
        task = asyncio.create_task(listener.run())
        try:
            await asyncio.wait_for(listener.registered.wait(), TIMEOUT)
            for garbage in (b"\xff\xfe garbage \r\n\r\n", b"GET / HTTP/1.1\r\n\r\n", b"SWARM-ACCEPT nosuchtoken\r\n\r\n",
                            b"x" * (2 * 2**20)):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(garbage)
                try:
                    answer = await asyncio.wait_for(reader.read(), TIMEOUT)  # an error line at most, then closed
                except ConnectionResetError:  # closed with our unread bytes still in its buffer
                    answer = b""
                assert answer in (b"", b"HTTP/1.1 400 Bad Request\r\n\r\n"), answer
                writer.close()

            # Registering as `key`'s identity needs `key`: a signature by another key is refused.
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"SWARM-LISTEN\r\n\r\n")
            _, challenge = (await asyncio.wait_for(reader.readuntil(b"\n"), TIMEOUT)).decode().split()
            claimed = base64.b64encode(key.get_public_key().to_bytes()).decode()
            writer.write(f"{claimed} {impostor.sign(challenge.encode()).decode()}\n".encode())
            assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
            writer.close()
            assert relay.registered == [identity(key)]
            assert await round_trip(port, identity(key), b"unharmed") == b"unharmed"
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await listener.close()
            await relay.stop()
            local.close()

    asyncio.run(scenario())
