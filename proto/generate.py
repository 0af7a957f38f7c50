"""Regenerate the Python stubs of the wire protocol: `python proto/generate.py [OUT_DIR]`.

The stubs land in `swarm/wire/` (importable as `swarm.wire.swarm_peer_pb2`); tests/test_proto.py checks that the
committed ones match what this script produces from `proto/swarm_peer.proto`.
"""

import sys
from pathlib import Path

from grpc_tools import protoc

PROTO_DIR = Path(__file__).resolve().parent
REPO_ROOT = PROTO_DIR.parent


def generate(out_root: Path = REPO_ROOT) -> None:
    # Mapping the folder to the virtual path swarm/wire makes the generated imports read `from swarm.wire import ...`.
    args = [
        "protoc",
        f"-Iswarm/wire={PROTO_DIR}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        "swarm/wire/swarm_peer.proto",
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else REPO_ROOT)
