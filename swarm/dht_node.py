"""Starting this process's node of the swarm's DHT: checked initial peers, one clear error when none answers, and a
DHT process whose lifetime its parent owns.

hivemind runs the DHT in a child process (and the libp2p daemon under that). A supervisor's stop (systemd, `timeout`,
`kill -- -PGID`) sends SIGTERM to the whole process group; hivemind's child ignores SIGINT but not SIGTERM, so it
died first and every later DHT call of the parent (the offline announcement) waited forever on a dead process.
"""

import os
import signal
import threading
import time

import hivemind
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.p2p.p2p_daemon_bindings.utils import P2PDaemonError
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.multiaddr import Multiaddr

from swarm.errors import SwarmError
from swarm.identity import BytesSubkeyValidator

ORPHAN_CHECK_PERIOD = 1.0  # seconds between the DHT process's checks that its parent is alive
DHT_START_TIMEOUT = 60.0  # seconds a DHT node may take to join (hivemind's p2pd gives up on bootstrap peers sooner)


class InitialPeersError(SwarmError):
    """An initial peer that is not a multiaddr of a DHT node, or initial peers of which none answered."""


class SwarmDHT(hivemind.DHT):
    """hivemind's DHT whose process leaves SIGTERM to its parent, which shuts it down after announcing offline, and
    which shuts itself down if the parent dies first (killed before it could)."""

    def run(self) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        threading.Thread(target=self._follow_parent, args=(os.getppid(),), name="dht-parent-watch", daemon=True).start()
        super().run()

    def _follow_parent(self, parent: int) -> None:
        while os.getppid() == parent:
            time.sleep(ORPHAN_CHECK_PERIOD)
        self._outer_pipe.send(("_shutdown", [], {}))  # what the parent's shutdown() would have sent
        time.sleep(self.shutdown_timeout)
        os._exit(0)  # the libp2p daemon did not answer (it got the same signal): leave anyway

    def shutdown(self) -> None:
        super().shutdown()  # asks the process to stop, then falls back to SIGTERM, which it ignores
        if self.is_alive():
            self.kill()
            self.join(self.shutdown_timeout)


def check_initial_peers(addresses: list[str]) -> list[str]:
    """The addresses as given, each checked to be a multiaddr naming a DHT node ("/ip4/HOST/tcp/PORT/p2p/ID")."""
    for address in addresses:
        try:
            Multiaddr(address).value_for_protocol("p2p")
        except Exception as error:  # hivemind's multiaddr raises a handful of parse and lookup errors
            raise InitialPeersError(
                f"initial peer {address!r} is not a DHT node's multiaddr ({error}); copy one of the "
                "'--initial-peers /ip4/.../tcp/.../p2p/...' lines a bootstrap node or peer printed"
            ) from None
    return list(addresses)


def swarm_dht(private_key: RSAPrivateKey | None = None, *, start: bool = False, await_joined: bool = True,
              **kwargs) -> tuple[hivemind.DHT, RSASignatureValidator]:
    """A DHT node that enforces the swarm's record rules (every node of the swarm must), and its signer (with
    `private_key`, or a fresh key: a new identity). With `start`, its process starts, and it has joined the swarm
    when this returns unless `await_joined` is false (then `wait_joined` tells, while the caller does other work)."""
    initial_peers = check_initial_peers(list(kwargs.pop("initial_peers", None) or []))
    validator = RSASignatureValidator(private_key or RSAPrivateKey())
    dht = SwarmDHT(record_validators=[validator, BytesSubkeyValidator()], initial_peers=initial_peers, start=False, **kwargs)
    if start:
        dht.run_in_background(await_ready=False)
        if await_joined:
            wait_joined(dht)
    return dht, validator


def wait_joined(dht: hivemind.DHT) -> None:
    """Waits until a started node has joined the swarm; if it could not, shuts it down and says why."""
    try:
        dht.wait_until_ready(timeout=DHT_START_TIMEOUT)
    except P2PDaemonError as error:
        dht.shutdown()
        if "bootstrap peers" in str(error):
            raise InitialPeersError(
                f"none of the initial peers answered ({', '.join(dht.initial_peers)}): is the bootstrap node "
                "running, and is that address reachable from here? Check --initial-peers"
            ) from None
        raise
