"""The server side: serve a span of a model's blocks to the swarm."""
