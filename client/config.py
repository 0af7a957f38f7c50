"""What a client user can tune."""

from dataclasses import dataclass, field

from swarm.constants import QUANTIZATIONS


@dataclass
class ClientConfig:
    initial_peers: list[str] = field(default_factory=list)
    # Only use these peers (DHT ids), or never use those; empty means no restriction.
    allowed_peers: tuple[str, ...] = ()
    blocked_peers: tuple[str, ...] = ()
    # Seconds to wait for a peer's answer to a step or a forward pass.
    request_timeout: float = 60.0
    # Seconds to wait for a peer's answer to the ping that measures its round trip (routing).
    ping_timeout: float = 2.0
    # Seconds a peer may keep a new session waiting for cache memory.
    alloc_timeout: float = 30.0
    # Seconds between background re-reads of the swarm from the DHT (and re-measures of round trips).
    refresh_period: float = 5.0
    # A LoRA adapter hosted by peers (swarm-peer serve --adapters), by name: applied to inference and training,
    # and only peers hosting it are used. "" for none.
    active_adapter: str = ""
    # Which peers' weights to compute with: "any" (the fastest chain, whatever its peers' quantization), or only
    # peers that store their blocks' linear weights as "none" (exact: the checkpoint's floats), "int8" or "nf4".
    # Whatever the choice, a peer replacing another in an inference session (its history replayed) or checking
    # another's answers stores its weights the same way when the swarm has one (else the session logs the change).
    quantization: str = "any"
    # Log every chosen inference route (peer name@address[blocks)) at WARNING, so that it shows without set-up.
    show_route: bool = False
    max_message_bytes: int = 64 * 1024 * 1024
    # Inference steps go from peer to peer along the chain (each peer still answers the client, which keeps the
    # outputs to replay on a replacement); False: the client relays every hop's output itself.
    peer_to_peer: bool = True
    # Activations on the wire (both ways, and pushed from peer to peer): "none" (the peers' dtype, lossless),
    # "float16", "bfloat16" (half of float32's bytes), or "int8" (blockwise 8-bit, ~27% of float32's bytes; lossy).
    compression: str = "none"
    # How many times a failed hop is replaced (with another peer, history replayed) before giving up.
    max_retries: int = 3
    # A failing peer is avoided for ban_seconds, doubling with each further failure up to max_ban_seconds.
    ban_seconds: float = 15.0
    max_ban_seconds: float = 300.0
    # Check peers' answers: other peers serving the same blocks recompute them from the same inputs (see
    # client/verification.py). An inference session is checked at the end of every generate call (nothing is
    # returned unchecked) and, if verify_every > 0, also after a random number of steps between half and one and
    # a half times it (a liar is caught sooner, but each check recomputes the whole cache); training calls are all
    # checked.
    verify: bool = True
    verify_every: int = 0
    # Trust is earned: a peer's inference answers are checked at every call until it has passed verify_probation
    # checks with this client; after that each check of it happens with probability spot_check_rate only, drawn anew
    # each time (the peer cannot tell a checked call from another). A trusted peer that turns liar is caught after
    # 1 / spot_check_rate - 1 unchecked calls on average, and those calls' results say they were not checked
    # (`verification.spot_skipped`). spot_check_rate=1.0 checks every call of every peer. Training calls are all
    # checked.
    verify_probation: int = 10
    spot_check_rate: float = 0.25
    # A peer caught answering wrong is avoided for liar_ban_seconds, doubling each time up to max_liar_ban_seconds.
    liar_ban_seconds: float = 3600.0
    max_liar_ban_seconds: float = 7 * 24 * 3600.0

    def __post_init__(self) -> None:
        if not 0.0 < self.spot_check_rate <= 1.0:
            raise ValueError(f"spot_check_rate must be in (0, 1], not {self.spot_check_rate!r}")
        if self.verify_probation < 0:
            raise ValueError(f"verify_probation must be >= 0, not {self.verify_probation!r}")
        if self.quantization != "any" and self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be any, {', '.join(QUANTIZATIONS)}; not {self.quantization!r}")
