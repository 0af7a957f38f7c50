"""`swarm-peer api`: the official `openai` client against a real swarm (bootstrap + 2 peers + the server), every
answer compared with local `transformers`; and the chat page in a real headless chromium."""

import json
import socket
import threading
import time
import types
import urllib.parse

import httpx2 as httpx
import openai
import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from peer.local_swarm import PeerHandle, spawn_cli, start_peers
from swarm.checkpoint_maker import save_random_checkpoint, tiny_llama_config
from swarm.wire import swarm_peer_pb2 as pb
from swarm.wire import swarm_peer_pb2_grpc as pb_grpc
from tests.browser import Chromium

pytestmark = pytest.mark.slow

CACHE_TOKENS = 4096
MESSAGES = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "Name a colour."}]


def start_api(path: str, bootstrap: str, *args: str):
    server = spawn_cli("api", path, "--initial-peers", bootstrap, "--port", "0", "--model-name", "chatty", *args)
    url = server.wait_for_line(r"serving \S+ at (http://\S+)/v1").group(1)
    return server, url


@pytest.fixture(scope="module")
def swarm(tmp_path_factory, bootstrap, connect):
    """A model of its own (so no other test's peers serve it), its two peers, and the API server over them."""
    path = str(save_random_checkpoint(tmp_path_factory.mktemp("models") / "chatty", tiny_llama_config(), seed=21))
    peers = start_peers(path, bootstrap, ["0:2", "2:4"], "--cache-tokens", str(CACHE_TOKENS))
    server, url = start_api(path, bootstrap)
    channels = [connect(peer) for peer in peers]
    yield types.SimpleNamespace(
        path=path, url=url, server=server, stubs=[pb_grpc.SwarmPeerStub(channel) for channel in channels],
        client=openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120),
        tokenizer=AutoTokenizer.from_pretrained(path),
        reference=LlamaForCausalLM.from_pretrained(path).eval().requires_grad_(False),
    )
    for channel in channels:
        channel.close()
    server.stop()
    for peer in peers:
        peer.process.stop()


def local_continuation(swarm, ids: torch.Tensor, max_tokens: int, **sampling) -> list[str]:
    """What local `transformers` generates after `ids` [1, length], decoded: one text per returned sequence."""
    output = swarm.reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                      pad_token_id=0, **sampling)
    return [swarm.tokenizer.decode(row[ids.shape[1] :], skip_special_tokens=True) for row in output]


def prompt_ids(swarm, prompt: str) -> torch.Tensor:
    return swarm.tokenizer(prompt, return_tensors="pt")["input_ids"]


def chat_ids(swarm, messages) -> torch.Tensor:
    return swarm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True,
                                               return_tensors="pt")["input_ids"]


def streamed_text(stream) -> tuple[str, str | None, object]:
    """The text of a one-choice stream, its finish reason, and its usage chunk's usage (if asked for)."""
    text, finish_reason, usage = "", None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            piece = choice.delta.content if hasattr(choice, "delta") else choice.text
            text += piece or ""
            finish_reason = choice.finish_reason or finish_reason
    return text, finish_reason, usage


def cache_left(swarm) -> list[int]:
    return [stub.Info(pb.InfoRequest(), timeout=10).cache_tokens_left for stub in swarm.stubs]


def test_models_and_health(swarm):
    (card,) = swarm.client.models.list().data
    assert card.id == "chatty" and swarm.client.models.retrieve("chatty").id == "chatty"
    health = httpx.get(f"{swarm.url}/health", timeout=30)
    assert health.status_code == 200 and health.json()["missing_blocks"] == [] and health.json()["peers"] == 2


def test_greedy_completion_is_local_greedy_streamed_or_not(swarm):
    ids = prompt_ids(swarm, "The swarm said")
    (expected,) = local_continuation(swarm, ids, 12, do_sample=False)
    answer = swarm.client.completions.create(model="chatty", prompt="The swarm said", max_tokens=12, temperature=0)
    assert answer.choices[0].text == expected
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (ids.shape[1], 12)
    assert answer.choices[0].finish_reason == "length"
    stream = swarm.client.completions.create(model="chatty", prompt="The swarm said", max_tokens=12, temperature=0,
                                             stream=True, stream_options={"include_usage": True})
    text, finish_reason, usage = streamed_text(stream)
    assert (text, finish_reason, usage.completion_tokens) == (expected, "length", 12)


def test_greedy_chat_is_local_greedy_on_the_templated_prompt(swarm):
    (expected,) = local_continuation(swarm, chat_ids(swarm, MESSAGES), 10, do_sample=False)
    answer = swarm.client.chat.completions.create(model="chatty", messages=MESSAGES, max_tokens=10, temperature=0)
    assert answer.choices[0].message.content == expected and answer.choices[0].message.role == "assistant"
    assert answer.usage.prompt_tokens == chat_ids(swarm, MESSAGES).shape[1]
    stream = swarm.client.chat.completions.create(model="chatty", messages=MESSAGES, max_tokens=10, temperature=0,
                                                  stream=True)
    assert streamed_text(stream)[:2] == (expected, "length")


def test_seeded_sampling_repeats_itself_and_draws_what_local_draws(swarm):
    fields = dict(model="chatty", prompt="Once", max_tokens=10, temperature=0.8, top_p=0.9, seed=1234, n=2,
                  extra_body={"top_k": 40})
    first = [choice.text for choice in swarm.client.completions.create(**fields).choices]
    again = [choice.text for choice in swarm.client.completions.create(**fields).choices]
    assert first == again and first[0] != first[1]
    torch.manual_seed(1234)
    expected = local_continuation(swarm, prompt_ids(swarm, "Once"), 10, do_sample=True, temperature=0.8, top_p=0.9,
                                  top_k=40, num_return_sequences=2)
    assert first == expected
    other_seed = swarm.client.completions.create(**{**fields, "seed": 99}).choices
    assert [choice.text for choice in other_seed] != first


def test_stop_strings_and_max_tokens_end_as_they_should(swarm):
    (text,) = local_continuation(swarm, prompt_ids(swarm, "Stop"), 24, do_sample=False)
    cut = next(k for k in range(4, 20) if text.find(text[k : k + 2]) == k)
    stop = text[cut : cut + 2]
    answer = swarm.client.completions.create(model="chatty", prompt="Stop", max_tokens=24, temperature=0,
                                             stop=[stop, "never-there"])
    assert (answer.choices[0].text, answer.choices[0].finish_reason) == (text[:cut], "stop")
    assert answer.usage.completion_tokens < 24
    stream = swarm.client.completions.create(model="chatty", prompt="Stop", max_tokens=24, temperature=0, stop=stop,
                                             stream=True)
    assert streamed_text(stream)[:2] == (text[:cut], "stop")
    short = swarm.client.completions.create(model="chatty", prompt="Stop", max_tokens=3, temperature=0)
    assert (short.choices[0].finish_reason, short.usage.completion_tokens) == ("length", 3)


def test_concurrent_streams_each_get_their_own_text(swarm):
    prompts = [f"Request number {index} says" for index in range(8)]
    expected = [local_continuation(swarm, prompt_ids(swarm, prompt), 16, do_sample=False)[0] for prompt in prompts]
    got: dict[int, str] = {}

    def ask(index: int) -> None:
        client = openai.OpenAI(base_url=f"{swarm.url}/v1", api_key="unused", max_retries=0, timeout=120)
        stream = client.completions.create(model="chatty", prompt=prompts[index], max_tokens=16, temperature=0,
                                           stream=True)
        got[index] = streamed_text(stream)[0]

    threads = [threading.Thread(target=ask, args=(index,)) for index in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert [got.get(index) for index in range(8)] == expected


def test_a_client_that_goes_away_frees_the_peers_cache(swarm):
    full = cache_left(swarm)
    stream = swarm.client.completions.create(model="chatty", prompt="Go on and on", max_tokens=1500,
                                             temperature=0, stream=True, extra_body={"ignore_eos": True})
    for _, _ in zip(range(5), stream):
        pass
    during = cache_left(swarm)
    assert all(used < total for used, total in zip(during, full)), (during, full)
    stream.close()
    deadline = time.monotonic() + 15
    while cache_left(swarm) != full and time.monotonic() < deadline:
        time.sleep(0.1)
    assert cache_left(swarm) == full


@pytest.mark.parametrize("fields, status, words", [
    (dict(model="nobody"), 404, "does not exist"),
    (dict(temperature=5), 400, "temperature"),
    (dict(n=0), 400, "n:"),
    (dict(max_tokens=4000), 400, "maximum context length"),
    (dict(stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    (dict(logit_bias={"999999": 1}), 400, "logit_bias"),
    (dict(prompt=[1, 2, 10**9]), 400, "token ids"),
    (dict(prompt=""), 400, "no tokens"),
    (dict(best_of=3), 400, "best_of"),
])
def test_each_bad_request_gets_its_4xx_and_the_server_keeps_serving(swarm, fields, status, words):
    body = {"model": "chatty", "prompt": "Hi", "max_tokens": 2, **fields}
    answer = httpx.post(f"{swarm.url}/v1/completions", json=body, timeout=30)
    assert answer.status_code == status, answer.text
    assert words in answer.json()["error"]["message"]
    ok = swarm.client.completions.create(model="chatty", prompt="Hi", max_tokens=2, temperature=0)
    assert ok.usage.completion_tokens == 2


def test_garbage_bodies_get_400(swarm):
    for content in (b"{not json", b"[1, 2]", json.dumps({"model": "chatty"}).encode(), b"\xff\xfe"):
        answer = httpx.post(f"{swarm.url}/v1/chat/completions", content=content, timeout=30,
                            headers={"Content-Type": "application/json"})
        assert answer.status_code == 400 and "error" in answer.json(), (content, answer.text)
    with pytest.raises(openai.BadRequestError):
        swarm.client.chat.completions.create(model="chatty", messages=[{"role": "robot", "content": "beep"}])


def test_a_swarm_with_a_gap_answers_503_naming_the_blocks(swarm, tmp_path, bootstrap):
    path = str(save_random_checkpoint(tmp_path / "gappy", tiny_llama_config(), seed=22))
    (peer,) = start_peers(path, bootstrap, ["0:2"])
    server, url = start_api(path, bootstrap)
    try:
        health = httpx.get(f"{url}/health", timeout=30)
        assert health.status_code == 503 and health.json()["missing_blocks"] == [2, 3]
        answer = httpx.post(f"{url}/v1/completions", json={"model": "chatty", "prompt": "Hi"}, timeout=30)
        assert answer.status_code == 503 and "block(s) 2-3" in answer.json()["error"]["message"], answer.text
    finally:
        server.stop()
        peer.process.stop()


def test_the_chat_page_streams_a_reply(swarm):
    message = "Hello there"
    messages = [{"role": "user", "content": message}]
    (expected,) = local_continuation(swarm, chat_ids(swarm, messages), 300, do_sample=False)
    browser = Chromium()
    try:
        page = browser.open(f"{swarm.url}/")
        page.wait_for("document.getElementById('model').textContent === 'chatty'")
        page.evaluate("document.getElementById('temperature').value = '0';"
                      "document.getElementById('max-tokens').value = '300'")
        page.evaluate("document.getElementById('input').focus()")
        page.type_text(message)
        page.press("Enter", 13)
        reply = "document.querySelector('.message.assistant')"
        partial = page.wait_for(f"{reply} && {reply}.dataset.state === 'streaming' && {reply}.textContent.length > 0"
                                f" && {reply}.textContent")
        page.wait_for(f"{reply}.dataset.state === 'done'", timeout=120)
        final = page.evaluate(f"{reply}.textContent")
        assert final == expected and expected.startswith(partial) and len(partial) < len(final)
        assert page.evaluate("document.querySelector('.message.user').textContent") == message
        assert "route:" in page.wait_for("document.getElementById('stats').textContent")
    finally:
        browser.close()


def test_a_liar_on_the_fastest_route_changes_no_answer(tmp_path, bootstrap, monkeypatch):
    """A liar (wrong by a lot) serves 0:4 in one quick hop: the route the server picks first, over honest chains
    0:2 + 2:4 and 0:1 + 1:4 whose every answer takes 50 ms more (two more opinions of every block, so that a
    disagreement has a majority). Every answer, whole or streamed, is still local greedy's; the liar is caught."""
    path = str(save_random_checkpoint(tmp_path / "lied-to", tiny_llama_config(), seed=23))
    monkeypatch.setenv("SWARM_TEST_PEER_DELAY", "0.05")
    honest = start_peers(path, bootstrap, ["0:2", "2:4", "0:1", "1:4"], module="tests.slow_peer")
    liar = PeerHandle.from_online_line(spawn_cli(
        "serve", path, "--initial-peers", bootstrap, "--blocks", "0:4", "--announce-period", "5", "--num-threads", "1",
        module="tests.liar_peer", env={"SWARM_TEST_LIE": "noise:1.0"},
    ))
    server, url = start_api(path, bootstrap)
    try:
        deadline = time.monotonic() + 60  # until the server's view of the swarm holds all five peers
        while httpx.get(f"{url}/health", timeout=30).json()["peers"] < 5 and time.monotonic() < deadline:
            time.sleep(0.5)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        tokenizer, reference = AutoTokenizer.from_pretrained(path), LlamaForCausalLM.from_pretrained(path).eval()
        ids = tokenizer("Trust me", return_tensors="pt")["input_ids"]
        with torch.no_grad():
            output = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
        expected = tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True)
        caught, routes = [], []
        for _ in range(6):
            answer = client.completions.create(model="chatty", prompt="Trust me", max_tokens=12, temperature=0)
            assert answer.choices[0].text == expected
            caught += [conviction["peer_id"] for conviction in answer.swarm["verification"]["caught"]]
            routes.append([(hop["peer_id"][:8], hop["blocks"]) for hop in answer.swarm["route"]])
        assert liar.peer_id in caught, (liar.peer_id, routes)  # convicted whether its own answers or its second opinion were checked
        stream = client.completions.create(model="chatty", prompt="Trust me", max_tokens=12, temperature=0, stream=True)
        assert streamed_text(stream)[0] == expected
    except Exception:
        print("".join(server.output))
        raise
    finally:
        server.stop()
        liar.process.stop()
        for peer in honest:
            peer.process.stop()


def test_a_queued_stream_whose_client_left_gives_its_place_up(swarm, bootstrap):
    """With one slot taken, a stream waits its turn; its client leaving frees the place at once, not when its turn
    has come and its prefill is done."""
    server, url = start_api(swarm.path, bootstrap, "--max-concurrent", "1")
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    requests = lambda: httpx.get(f"{url}/health", timeout=30).json()["requests"]  # noqa: E731

    def wait_for(expected: dict) -> None:
        deadline = time.monotonic() + 15
        while requests() != expected and time.monotonic() < deadline:
            time.sleep(0.1)
        assert requests() == expected

    try:
        holder = client.completions.create(model="chatty", prompt="Hold the slot", max_tokens=1500, temperature=0,
                                           stream=True, extra_body={"ignore_eos": True})
        next(iter(holder))
        body = json.dumps(dict(model="chatty", prompt="queued", max_tokens=4, stream=True)).encode()
        host, port = urllib.parse.urlsplit(url).hostname, urllib.parse.urlsplit(url).port
        with socket.create_connection((host, port), timeout=30) as queued:  # no answer comes before its turn
            queued.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: api\r\nContent-Type: application/json\r\n"
                           b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            wait_for({"running": 1, "waiting": 1})
        wait_for({"running": 1, "waiting": 0})  # while the holder still generates
        holder.close()
        wait_for({"running": 0, "waiting": 0})
    finally:
        server.stop()
