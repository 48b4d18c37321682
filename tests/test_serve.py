"""The OpenAI-compatible server, over real HTTP on loopback."""

import json
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import pytest

import runtime
from runtime.serve import make_server


@pytest.fixture(scope="module")
def server(tiny_artifacts):
    gen = runtime.load(tiny_artifacts("gemma3-270m-tiny"))
    srv = make_server(gen, port=0, max_concurrent=3, max_queue=8)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv, f"http://127.0.0.1:{srv.server_address[1]}", gen
    srv.shutdown()
    srv.server_close()


def _post(url, payload, raw=None):
    data = raw if raw is not None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _events(body):
    lines = [l[len("data: "):] for l in body.split("\n\n") if l.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(l) for l in lines[:-1]]


def test_health_and_models(server):
    _, url, gen = server
    with urllib.request.urlopen(url + "/health") as r:
        assert json.loads(r.read()) == {"status": "ok", "model": "gemma3-270m-tiny",
                                        "target": gen.target}
    with urllib.request.urlopen(url + "/v1/models") as r:
        assert json.loads(r.read())["data"][0]["id"] == "gemma3-270m-tiny"


def test_completion_and_stream_equal_runtime(server):
    _, url, gen = server
    want = gen.generate("the cat", max_new_tokens=10)
    status, body = _post(url + "/v1/completions",
                         {"model": "x", "prompt": "the cat", "max_tokens": 10, "temperature": 0})
    assert status == 200, body
    out = json.loads(body)
    assert out["object"] == "text_completion" and out["choices"][0]["text"] == want
    assert out["usage"]["completion_tokens"] == 10
    assert out["choices"][0]["finish_reason"] == "length"
    status, body = _post(url + "/v1/completions", {"prompt": "the cat", "max_tokens": 10,
                                                   "temperature": 0, "stream": True})
    events = _events(body)
    assert "".join(e["choices"][0]["text"] for e in events) == want
    assert events[-1]["choices"][0]["finish_reason"] == "length"


def test_chat_and_stream(server):
    _, url, gen = server
    msgs = [{"role": "user", "content": "hi there"}]
    want = gen.generate(msgs, chat=True, max_new_tokens=8)
    status, body = _post(url + "/v1/chat/completions",
                         {"messages": msgs, "max_tokens": 8, "temperature": 0})
    assert status == 200, body
    out = json.loads(body)
    assert out["choices"][0]["message"] == {"role": "assistant", "content": want}
    status, body = _post(url + "/v1/chat/completions",
                         {"messages": msgs, "max_tokens": 8, "temperature": 0, "stream": True})
    events = _events(body)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == want
    assert events[-1]["object"] == "chat.completion.chunk"


def test_stop_strings(server):
    _, url, gen = server
    full = gen.generate("the cat", max_new_tokens=12)
    stop = full[3:5]
    status, body = _post(url + "/v1/completions", {"prompt": "the cat", "max_tokens": 12,
                                                   "temperature": 0, "stop": stop})
    out = json.loads(body)["choices"][0]
    assert out["text"] == full[:full.find(stop)] and out["finish_reason"] == "stop"


def test_concurrent_clients(server):
    _, url, _ = server
    payloads = [{"prompt": p, "max_tokens": 8, "temperature": 0.9, "seed": i}
                for i, p in enumerate(["the cat", "a dog", "on it", "she is", "to the", "we"])]
    want = [json.loads(_post(url + "/v1/completions", p)[1])["choices"][0]["text"]
            for p in payloads]
    got = [None] * len(payloads)

    def client(i):
        got[i] = json.loads(_post(url + "/v1/completions", payloads[i])[1])["choices"][0]["text"]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(payloads))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == want


@pytest.mark.parametrize("path,payload,raw,status,message", [
    ("/v1/completions", None, b"{not json", 400, "malformed JSON"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "ten"}, None, 400, "'max_tokens' must be an integer"),
    ("/v1/completions", {"prompt": 5}, None, 400, "'prompt' must be a string"),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, None, 400, "'stream' must be a boolean"),
    ("/v1/completions", {"max_tokens": 3}, None, 400, "'prompt' is required"),
    ("/v1/completions", {"prompt": "the " * 80}, None, 400, "exceeds the model's context of 64"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, None, 400, "temperature must be"),
    ("/v1/completions", {"prompt": "x", "top_p": 1.5}, None, 400, "top_p must be"),
    ("/v1/completions", {"prompt": "x", "n": 2}, None, 400, "only n=1"),
    ("/v1/chat/completions", {"messages": [{"role": "bot", "content": "x"}]}, None, 400,
     "unknown chat role"),
    ("/v1/embeddings", {"input": "x"}, None, 404, "no route POST /v1/embeddings"),
])
def test_bad_requests_get_4xx_and_server_survives(server, path, payload, raw, status, message):
    _, url, _ = server
    got, body = _post(url + path, payload, raw)
    assert got == status, body
    err = json.loads(body)["error"]
    assert message in err["message"]
    with urllib.request.urlopen(url + "/health") as r:
        assert r.status == 200


def test_over_capacity_gets_429(server):
    srv, url, _ = server
    with srv.lock:
        srv.admitted += srv.max_waiting          # as if the slots and queue were all taken
    try:
        status, body = _post(url + "/v1/completions", {"prompt": "x", "max_tokens": 2})
    finally:
        with srv.lock:
            srv.admitted -= srv.max_waiting
    assert status == 429 and "too many requests" in json.loads(body)["error"]["message"]
    assert _post(url + "/v1/completions", {"prompt": "x", "max_tokens": 2})[0] == 200


def test_serve_cli_reports_bad_artifacts(tmp_path):
    r = subprocess.run([sys.executable, "-m", "runtime.serve", "--artifacts", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "has no manifest.json" in r.stderr
    assert "Traceback" not in r.stderr
