"""The network layer of the data plane, in one room: how peers and clients reach each other and what they trust.

- `tls`: every peer's TLS certificate is made from its DHT identity key and announced in its signed record; a
  connection is pinned to the certificate of the record it was routed by (no certificate authority).
- `endpoints`: gRPC channels to an announced peer, direct or through its relay, always TLS.
- `relay`: reachable peers (and the bootstrap node) relay TCP connections to peers behind NAT; TLS runs end to
  end through the relay, which sees only ciphertext.
- `reachability`: a starting peer asks the swarm which address it comes from and whether it can be dialled back
  there, and so decides what to announce (direct address, or a relay).
- `addresses`: address helpers (loopback swarms, host:port parsing, interface addresses).
"""
