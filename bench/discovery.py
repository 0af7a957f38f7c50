"""Discovery after start-up, with real processes: start a bootstrap node and 3 peers at once, then a fresh client
reads the swarm; a cycle misses if the client does not see every peer online on its first read.

    python -m bench.discovery [--cycles 50] [--model examples/demo_model]

Prints each cycle and a summary (starts, seconds to a complete view, misses).
"""

import argparse
import statistics
import time

from peer.local_swarm import start_bootstrap, start_peers
from swarm.checkpoint import Checkpoint
from swarm.dht_node import swarm_dht
from swarm.dht_records import fetch_peer_spans

SPANS = ["0:2", "2:4", "0:4"]
PATIENCE = 60.0  # seconds a missing peer is waited for before the cycle counts as a failure


def cycle(model: str, prefix: str, num_blocks: int) -> tuple[float, float, int]:
    """(seconds until every peer said it is online, seconds until a fresh client saw them all, reads it took)."""
    started = time.perf_counter()
    node, address = start_bootstrap()
    peers = []
    try:
        peers = start_peers(model, address, SPANS)
        online = time.perf_counter()
        dht = swarm_dht(initial_peers=[address], client_mode=True, start=True)[0]
        try:
            expected = {peer.peer_id for peer in peers}
            reads = 0
            while time.perf_counter() - online < PATIENCE:
                reads += 1
                if expected <= {span.peer_id for span in fetch_peer_spans(dht, prefix, num_blocks)}:
                    return online - started, time.perf_counter() - online, reads
                time.sleep(0.5)
            return online - started, float("inf"), reads
        finally:
            dht.shutdown()
    finally:
        for peer in peers:
            peer.process.stop()
        node.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cycles", type=int, default=50)
    parser.add_argument("--model", default="examples/demo_model")
    args = parser.parse_args()
    checkpoint = Checkpoint(args.model)
    prefix, num_blocks = checkpoint.model_prefix(), checkpoint.config.num_hidden_layers
    starts, views, misses = [], [], 0
    for index in range(args.cycles):
        start, view, reads = cycle(args.model, prefix, num_blocks)
        starts.append(start)
        views.append(view)
        misses += reads > 1
        print(f"cycle {index + 1}: online in {start:.1f}s, complete view {view:.2f}s later after {reads} read(s)", flush=True)
    seen = [view for view in views if view != float("inf")]
    print(
        f"{args.cycles} cycles: {misses} missed the first read, {args.cycles - len(seen)} never complete; start "
        f"median {statistics.median(starts):.1f}s ({min(starts):.1f}-{max(starts):.1f}); complete view median "
        f"{statistics.median(seen):.2f}s ({min(seen):.2f}-{max(seen):.2f}) after the last peer was online"
    )


if __name__ == "__main__":
    main()
