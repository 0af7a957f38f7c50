import contextlib

import pytest
from transformers import LlamaForCausalLM

from client import AutoDistributedModelForCausalLM
from peer.local_swarm import start_bootstrap, start_peers
from swarm.checkpoint_maker import save_random_checkpoint, tiny_llama_config
from swarm.dht_node import swarm_dht
from swarm.net.endpoints import secure_channel


@pytest.fixture(scope="session", autouse=True)
def throughput_cache_dir(tmp_path_factory):
    """Peers cache their measured throughput here (inherited by every peer process), not in the user's home."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SWARM_CACHE_DIR", str(tmp_path_factory.mktemp("swarm-cache")))
        yield


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


@pytest.fixture(scope="session")
def connect(bootstrap):
    """`connect(handle, options)`: a TLS channel to a peer, pinned to the certificate of its signed record (what
    every client does); tests use it for raw requests."""
    dht = swarm_dht(initial_peers=[bootstrap], client_mode=True, start=True)[0]
    yield lambda handle, options=(): secure_channel(handle.endpoint(dht), list(options))
    dht.shutdown()


@pytest.fixture(scope="session")
def reference(tiny_llama) -> LlamaForCausalLM:
    """The same checkpoint in local transformers, the yardstick of every result."""
    return LlamaForCausalLM.from_pretrained(tiny_llama).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def peers(request, tiny_llama, bootstrap):
    """One peer per entry of the test module's SPANS ({name: "start:end"}), returned by name."""
    spans = request.module.SPANS
    handles = start_peers(tiny_llama, bootstrap, list(spans.values()))
    yield dict(zip(spans, handles))
    for handle in handles:
        handle.process.stop()


@pytest.fixture
def served(bootstrap):
    """`with served(path, spans) as model:` a client model routed only through fresh peers serving `spans`."""

    @contextlib.contextmanager
    def serve(path: str, spans: list[str]):
        peers = start_peers(path, bootstrap, spans)
        try:
            model = AutoDistributedModelForCausalLM.from_pretrained(
                path, initial_peers=[bootstrap], allowed_peers=tuple(peer.peer_id for peer in peers)
            )
            try:
                yield model
            finally:
                model.close()
        finally:
            for peer in peers:
                peer.process.stop()

    return serve
