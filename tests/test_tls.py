"""The data plane is TLS pinned to identities: a peer whose certificate is not the one its signed record announces
is refused, a record that carries a certificate its signer does not own is ignored, and TLS holds up end to end."""

import asyncio
import os

import grpc
import pytest
import torch
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from client import AutoDistributedModelForCausalLM
from peer.local_swarm import PeerHandle, spawn_cli
from swarm.constants import PROTOCOL_VERSION
from swarm.dht_node import swarm_dht
from swarm.dht_records import ServerRecord, ServerState, block_key, fetch_peer_spans
from swarm.identity import identity_of, own_subkey
from swarm.net.endpoints import Endpoint, secure_channel
from swarm.net.reachability import handshake
from swarm.net.tls import TLSIdentity, certificate_matches
from swarm.wire import swarm_peer_pb2 as pb
from swarm.wire import swarm_peer_pb2_grpc as pb_grpc


def tls_identity(key: RSAPrivateKey) -> TLSIdentity:
    return TLSIdentity(key, identity_of(RSASignatureValidator(key).local_public_key))


def test_certificates_are_made_from_the_identity_key():
    key, other = RSAPrivateKey(), RSAPrivateKey()
    tls = tls_identity(key)
    assert tls.certificate == tls_identity(key).certificate  # a pure function of the key
    assert certificate_matches(tls.certificate, key.get_public_key().to_bytes())
    assert not certificate_matches(tls.certificate, other.get_public_key().to_bytes())
    assert not certificate_matches(b"garbage", key.get_public_key().to_bytes())


def test_channels_refuse_records_without_certificate_or_address():
    with pytest.raises(ValueError, match="no certificate"):
        secure_channel(Endpoint("sw1", b"", address="127.0.0.1:1"))
    with pytest.raises(ValueError, match="no address"):
        secure_channel(Endpoint("sw1", tls_identity(RSAPrivateKey()).certificate))


@pytest.fixture(scope="module")
def honest_and_impostor(tiny_llama, bootstrap, tmp_path_factory):
    stolen = tmp_path_factory.mktemp("keys") / "honest.key"
    common = ("--initial-peers", bootstrap, "--blocks", "0:4", "--announce-period", "5", "--num-threads", "1")
    honest_process = spawn_cli("serve", tiny_llama, *common, "--identity-path", str(stolen))
    honest = PeerHandle.from_online_line(honest_process)
    os.environ["IMPOSTOR_KEY"] = str(stolen)
    try:
        impostor_process = spawn_cli("serve", tiny_llama, *common, module="tests.impostor_peer")
    finally:
        del os.environ["IMPOSTOR_KEY"]
    impostor = PeerHandle.from_online_line(impostor_process)
    yield honest, impostor
    for handle in (honest, impostor):
        handle.process.stop()


def test_a_peer_presenting_another_peers_certificate_is_refused(honest_and_impostor, connect, tiny_llama, bootstrap, reference):
    honest, impostor = honest_and_impostor
    dht = swarm_dht(initial_peers=[bootstrap], client_mode=True, start=True)[0]
    try:
        honest_endpoint, impostor_endpoint = honest.endpoint(dht), impostor.endpoint(dht)
    finally:
        dht.shutdown()
    assert asyncio.run(handshake(honest_endpoint)) is None
    assert "no TLS connection" in asyncio.run(handshake(impostor_endpoint, timeout=2))
    with connect(impostor) as channel, pytest.raises(grpc.RpcError) as error:
        pb_grpc.SwarmPeerStub(channel).Info(pb.InfoRequest(), timeout=5)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    # The impostor's real certificate is the honest peer's: dialled as the honest peer, at the impostor's address,
    # it answers -- which is only the honest peer's key at work, so pinning to identities, not addresses, is right.
    stolen_route = Endpoint(honest.peer_id, honest_endpoint.certificate, address=impostor.address)
    assert asyncio.run(handshake(stolen_route)) is None

    model = AutoDistributedModelForCausalLM.from_pretrained(
        tiny_llama, initial_peers=[bootstrap], allowed_peers=(impostor.peer_id, honest.peer_id)
    )
    try:
        prompt = torch.tensor([[5, 6, 7]])
        expected = reference.generate(prompt, max_new_tokens=6, do_sample=False)
        assert torch.equal(model.generate(prompt, max_new_tokens=6, do_sample=False), expected)
        assert [hop.peer.peer_id for hop in model.remote.view.chain()] == [honest.peer_id]
    finally:
        model.close()


def test_a_record_carrying_a_certificate_its_signer_does_not_own_is_ignored(bootstrap, tiny_llama):
    forger, victim = RSAPrivateKey(), RSAPrivateKey()
    dht, validator = swarm_dht(forger, initial_peers=[bootstrap], client_mode=True, start=True)
    try:
        prefix = "forged-model"
        for certificate, expected in ((tls_identity(victim).certificate, 0), (tls_identity(forger).certificate, 1)):
            record = ServerRecord(ServerState.ONLINE, 0, 1, "127.0.0.1:1", "float32", PROTOCOL_VERSION,
                                  certificate=certificate)
            assert dht.store(block_key(prefix, 0), subkey=own_subkey(validator), value=record.to_dict(),
                             expiration_time=get_dht_time() + 30)
            assert len(fetch_peer_spans(dht, prefix, 1)) == expected
    finally:
        dht.shutdown()
