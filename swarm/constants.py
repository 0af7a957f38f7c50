"""Numbers both sides agree on."""

PROTOCOL_VERSION = "3"

# gRPC refuses messages above this size on both sides; larger payloads are a client error.
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024

# DHT key that lists the models the swarm serves (subkey: model prefix).
MODEL_INDEX_KEY = "_swarm.models"
# DHT key that lists the collaborative training runs (subkey: run name); see swarm/training_runs.py.
TRAINING_RUNS_KEY = "_swarm.training_runs"

DEFAULT_ANNOUNCE_PERIOD = 30.0

# gRPC status a peer ends a session with when it moved to other blocks (load balancing): the client continues the
# session elsewhere without holding it against the peer, which is healthy and now serves other blocks.
SPAN_MOVED_STATUS = "ABORTED"

# Network bandwidth a peer announces when its operator does not say (Mbit/s); it is not measured, since a peer
# cannot know which of its links the swarm will use.
DEFAULT_BANDWIDTH_MBPS = 100.0
DEFAULT_ACTIVATION_CACHE_MB = 512  # what a peer keeps of training Forwards for their Backwards (peer/activation_cache.py)
# How a peer may store its blocks' linear weights (swarm/quantization.py); "none" is exact.
QUANTIZATIONS = ("none", "int8", "nf4")
LINEAR_LAYOUTS = ("measured", "rows", "columns")  # how a peer's linear layers multiply (peer/linear_layout.py)
