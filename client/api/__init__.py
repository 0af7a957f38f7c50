"""An OpenAI-compatible HTTP server (and a chat page) on top of the swarm: `swarm-peer api MODEL_PATH ...`.

`protocol` reads and validates requests and writes OpenAI's response shapes, `engine` runs each request as its own
inference session on the swarm (sampling in `sampling`, stop strings and streaming text in `text`), `app` is the
FastAPI application that joins them, `cli` the command.
"""
