"""Numbers both sides agree on."""

PROTOCOL_VERSION = "1"

# gRPC refuses messages above this size on both sides; larger payloads are a client error.
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024

# DHT key that lists the models the swarm serves (subkey: model prefix).
MODEL_INDEX_KEY = "_swarm.models"

DEFAULT_ANNOUNCE_PERIOD = 30.0
