"""The committed stubs are what proto/generate.py makes from proto/swarm_peer.proto."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_generated_stubs_are_current(tmp_path):
    spec = importlib.util.spec_from_file_location("generate_proto", ROOT / "proto" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.generate(tmp_path)
    generated = sorted((tmp_path / "swarm" / "wire").iterdir())
    assert generated, "protoc produced nothing"
    for path in generated:
        committed = ROOT / "swarm" / "wire" / path.name
        assert committed.read_text() == path.read_text(), f"{committed} is stale: run python proto/generate.py"
