"""`swarm-peer api MODEL_PATH --initial-peers ...`: the OpenAI-compatible server (the `swarm-peer` group names this
command and loads it from here: it is the client side of the model, which peer code never imports)."""

import logging
import socket
from pathlib import Path

import click


@click.command()
@click.argument("model_path", type=click.Path(exists=True, file_okay=False))
@click.option("--initial-peers", multiple=True, help="Multiaddr of a DHT node of the swarm (repeatable).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address the HTTP server listens on.")
@click.option("--port", default=8000, show_default=True, help="Port of the HTTP server (0: any free port).")
@click.option("--model-name", help="The model's id in the API (default: the checkpoint folder's name).")
@click.option("--chat-template", type=click.Path(exists=True, dir_okay=False),
              help="A Jinja chat template file, for a tokenizer that has none (or to replace its own).")
@click.option("--max-concurrent", default=64, show_default=True,
              help="Requests generated at once (each is one inference session); more wait their turn.")
@click.option("--default-chat-tokens", default=512, show_default=True, help="max_tokens of a chat request that "
              "gives none (each request reserves peers' cache for its whole length).")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Have other peers recompute each generation's answers (see the README's threat model).")
def api(model_path: str, initial_peers, host: str, port: int, model_name: str | None, chat_template: str | None,
        max_concurrent: int, default_chat_tokens: int, verify: bool) -> None:
    """Serve MODEL_PATH's swarm over OpenAI's API (/v1/completions, /v1/chat/completions, /v1/models, /health)
    and a chat page at /."""
    if not initial_peers:
        raise click.UsageError("give --initial-peers MULTIADDR: a DHT node of the swarm that serves the model")
    listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restarted server gets its port back at once
    try:
        listener.bind((host, port))
        listener.listen(1024)
    except OSError as error:
        raise click.ClickException(f"cannot serve the API at {host}:{port}: {error.strerror or error}; "
                                   "choose another --port or --host") from None
    from swarm.dht_node import check_initial_peers

    check_initial_peers(list(initial_peers))
    import uvicorn
    from transformers import AutoTokenizer

    from client import AutoDistributedModelForCausalLM
    from client.api.app import create_app
    from client.api.engine import Engine

    model = AutoDistributedModelForCausalLM.from_pretrained(model_path, initial_peers=list(initial_peers),
                                                            verify=verify)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if chat_template is not None:
        tokenizer.chat_template = Path(chat_template).read_text()
    name = model_name or Path(model_path).resolve().name
    app = create_app(Engine(model, tokenizer, max_concurrent), name, default_chat_tokens)
    bound_host, bound_port = listener.getsockname()[:2]
    print(f"serving {name} at http://{bound_host}:{bound_port}/v1 (chat page at http://{bound_host}:{bound_port}/)",
          flush=True)
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5))
    try:
        server.run(sockets=[listener])
    finally:
        model.close()
    print("API server stopped", flush=True)
