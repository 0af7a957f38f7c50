import pytest

from swarm.checkpoint_maker import save_random_checkpoint, tiny_llama_config
from peer.local_swarm import start_bootstrap


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    """A 4-block Llama with GQA, sharded in small safetensors files (so peers go through the index)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    return str(save_random_checkpoint(path, tiny_llama_config(), max_shard_size="100KB"))


@pytest.fixture(scope="session")
def bootstrap():
    node, address = start_bootstrap()
    yield address
    node.stop()
