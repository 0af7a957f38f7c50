"""A relay for peers that nobody can dial (home NAT), on plain TCP; TLS runs end to end through it.

A peer behind NAT keeps one outbound *control* connection to a relay, proving its identity by signing the relay's
challenge with its identity key. A client (or a pushing peer) reaches it with an HTTP CONNECT to the relay naming
the peer's identity (gRPC does this itself, see `endpoints`): the relay asks the peer over the control connection
to open a *data* connection back, and splices the two. The relay sees only the TLS bytes between the two ends and
cannot answer in the peer's name (it has no key for the peer's certificate).

Unlike libp2p's circuit relay v2 (whose default reservation caps a relayed connection at 2 minutes and 128 KiB),
a tunnel here lives as long as both ends keep it: an inference session streams for as long as it generates. What
the relay bounds is what it holds: registered peers, open tunnels, and the size and time of every handshake.
"""

import asyncio
import base64
import logging
import secrets
from collections.abc import Awaitable, Callable
from contextlib import suppress

from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey

from swarm.identity import identity_of

logger = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 10.0
# A stream's buffer: what a handshake line may take at most, and how much a tunnel reads ahead (a small one would
# pause the socket every few KiB of a prefill's megabytes).
STREAM_LIMIT = 256 * 1024
MAX_REGISTERED = 256
MAX_TUNNELS = 1024
PIPE_CHUNK = 256 * 1024
KEEPALIVE_PERIOD = 15.0


def _owner_marker(public_key: bytes) -> bytes:
    return RSASignatureValidator.PUBLIC_KEY_FORMAT.replace(b"_key_", public_key)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(PIPE_CHUNK):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def splice(a: tuple[asyncio.StreamReader, asyncio.StreamWriter], b: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
    """Copies bytes both ways until either side closes, then closes both."""
    await asyncio.gather(_pipe(a[0], b[1]), _pipe(b[0], a[1]))


class RelayServer:
    """Serves CONNECT tunnels to the peers registered with it. Run on the relay host's event loop."""

    def __init__(self) -> None:
        self._listeners: dict[str, asyncio.StreamWriter] = {}  # identity -> its control connection
        self._waiting: dict[str, asyncio.Future] = {}  # token -> the data connection the peer opens for it
        self._tunnels = 0
        self._server: asyncio.base_events.Server | None = None

    @property
    def registered(self) -> list[str]:
        return sorted(self._listeners)

    async def start(self, host: str, port: int) -> int:
        self._server = await asyncio.start_server(self._handle, host, port, limit=STREAM_LIMIT)
        return self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._listeners.values()):
                writer.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT):
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            verb, _, argument = head.split("\r\n", 1)[0].partition(" ")
            if verb == "CONNECT":
                await self._connect(argument.split(" ")[0].rpartition(":")[0], reader, writer)
            elif verb == "SWARM-LISTEN":
                await self._listen(reader, writer)
            elif verb == "SWARM-ACCEPT":
                future = self._waiting.pop(argument.strip(), None)
                if future is None or future.done():
                    writer.close()
                    return
                future.set_result((reader, writer))  # the CONNECT side splices it
            else:
                writer.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
                writer.close()
        except Exception as error:  # whatever a stranger sends (garbage keys included) ends only its connection
            logger.debug(f"relay: dropped a connection with a bad or slow handshake: {error!r}")
            writer.close()

    async def _connect(self, identity: str, reader, writer) -> None:
        control = self._listeners.get(identity)
        if control is None or self._tunnels >= MAX_TUNNELS:
            status = b"404 Not Found" if control is None else b"503 Service Unavailable"
            writer.write(b"HTTP/1.1 " + status + b"\r\n\r\n")
            writer.close()
            return
        token = secrets.token_hex(16)
        future = self._waiting[token] = asyncio.get_running_loop().create_future()
        try:
            control.write(f"OPEN {token}\n".encode())
            await control.drain()
            async with asyncio.timeout(HANDSHAKE_TIMEOUT):
                peer_side = await future
        except (TimeoutError, ConnectionError, OSError):
            self._waiting.pop(token, None)
            writer.write(b"HTTP/1.1 504 Gateway Timeout\r\n\r\n")
            writer.close()
            return
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        self._tunnels += 1
        try:
            await splice((reader, writer), peer_side)
        finally:
            self._tunnels -= 1

    async def _listen(self, reader, writer) -> None:
        """A peer registers: it signs our challenge with the key its identity is derived from."""
        challenge = secrets.token_hex(16)
        writer.write(f"CHALLENGE {challenge}\n".encode())
        await writer.drain()
        async with asyncio.timeout(HANDSHAKE_TIMEOUT):
            public_key_b64, signature = (await reader.readuntil(b"\n")).decode().split()
        public_key = base64.b64decode(public_key_b64)
        if not RSAPublicKey.from_bytes(public_key).verify(challenge.encode(), signature.encode()):
            raise ValueError("bad signature on the relay challenge")
        identity = identity_of(_owner_marker(public_key))
        if identity not in self._listeners and len(self._listeners) >= MAX_REGISTERED:
            writer.write(b"FULL\n")
            writer.close()
            return
        previous = self._listeners.get(identity)
        if previous is not None:
            previous.close()  # the same peer reconnected: the newest control connection wins
        self._listeners[identity] = writer
        writer.write(b"OK\n")
        logger.info(f"relay: serving {identity}")
        try:
            while True:  # keepalive: a dead control connection is noticed when a write fails
                await asyncio.sleep(KEEPALIVE_PERIOD)
                writer.write(b"PING\n")
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            if self._listeners.get(identity) is writer:
                del self._listeners[identity]
            writer.close()


class RelayListener:
    """The NAT'd peer's side: keeps a control connection to the relay and connects each tunnel it announces to the
    local data plane at `local_port`. After FAILURES_BEFORE_MOVING failed attempts in a row it asks
    `choose_relay` for another relay (None: keep trying this one) and tells `on_move` (the peer re-announces)."""

    FAILURES_BEFORE_MOVING = 3

    def __init__(self, relay: str, key: RSAPrivateKey, local_port: int,
                 choose_relay: Callable[[str], Awaitable[str | None]] | None = None,
                 on_move: Callable[[str], None] = lambda _relay: None):
        self.key, self.local_port = key, local_port
        self.choose_relay, self.on_move = choose_relay, on_move
        self._use(relay)
        self.registered = asyncio.Event()
        self._tunnels: set[asyncio.Task] = set()

    def _use(self, relay: str) -> None:
        self.relay = relay
        self.host, _, port = relay.rpartition(":")
        self.host, self.port = self.host.strip("[]"), int(port)

    async def run(self) -> None:
        """Stays registered until cancelled, reconnecting after a lost control connection."""
        backoff, failures = 0.5, 0
        while True:
            try:
                await self._serve_once()
            except (ConnectionError, OSError, ValueError, TimeoutError, asyncio.IncompleteReadError) as error:
                logger.warning(f"relay {self.relay}: {error!r}; reconnecting in {backoff:.1f}s")
            failures = 0 if self.registered.is_set() else failures + 1
            self.registered.clear()
            if failures >= self.FAILURES_BEFORE_MOVING and self.choose_relay is not None:
                if (other := await self.choose_relay(self.relay)) is not None and other != self.relay:
                    logger.warning(f"relay {self.relay} is gone; moving to relay {other}")
                    self._use(other)
                    self.on_move(other)
                    failures, backoff = 0, 0.5
            await asyncio.sleep(backoff)
            backoff = 0.5 if failures == 0 else min(backoff * 2, 10.0)

    async def _serve_once(self) -> None:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(self.host, self.port), HANDSHAKE_TIMEOUT)
        try:
            writer.write(b"SWARM-LISTEN\r\n\r\n")
            async with asyncio.timeout(HANDSHAKE_TIMEOUT):
                verb, challenge = (await reader.readuntil(b"\n")).decode().split()
                if verb != "CHALLENGE":
                    raise ValueError(f"relay answered {verb!r} instead of a challenge")
                public_key = base64.b64encode(self.key.get_public_key().to_bytes()).decode()
                writer.write(f"{public_key} {self.key.sign(challenge.encode()).decode()}\n".encode())
                answer = (await reader.readuntil(b"\n")).strip()
            if answer != b"OK":
                raise ValueError(f"relay refused to register us: {answer!r}")
            self.registered.set()
            while line := await reader.readline():
                verb, _, token = line.decode().strip().partition(" ")
                if verb == "OPEN":
                    task = asyncio.create_task(self._open_tunnel(token))
                    self._tunnels.add(task)
                    task.add_done_callback(self._tunnels.discard)
            raise ConnectionError("the relay closed the control connection")
        finally:
            writer.close()

    async def _open_tunnel(self, token: str) -> None:
        try:
            relay_side = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port, limit=STREAM_LIMIT), HANDSHAKE_TIMEOUT
            )
            relay_side[1].write(f"SWARM-ACCEPT {token}\r\n\r\n".encode())
            local_side = await asyncio.open_connection("127.0.0.1", self.local_port, limit=STREAM_LIMIT)
        except (ConnectionError, OSError, TimeoutError) as error:
            logger.warning(f"relay {self.relay}: could not open a tunnel: {error!r}")
            return
        await splice(relay_side, local_side)

    async def close(self) -> None:
        for task in list(self._tunnels):
            task.cancel()
        with suppress(Exception):
            await asyncio.gather(*self._tunnels, return_exceptions=True)
