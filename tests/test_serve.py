"""The OpenAI-compatible server, over real HTTP on loopback."""

import json
import re
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
        state = json.loads(r.read())
    assert {k: state[k] for k in ("status", "model", "target")} == \
        {"status": "ok", "model": "gemma3-270m-tiny", "target": gen.target}
    assert state["in_flight"] == 0 and state["cancelled"] >= 0
    with urllib.request.urlopen(url + "/v1/models") as r:
        assert json.loads(r.read())["data"][0]["id"] == "gemma3-270m-tiny"


def test_completion_and_stream_equal_runtime(server):
    _, url, gen = server
    want = gen.generate("the cat", max_new_tokens=10)
    status, body = _post(url + "/v1/completions",
                         {"model": "gemma3-270m-tiny", "prompt": "the cat", "max_tokens": 10, "temperature": 0})
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
    # reliability cases (shared/reliability-cases.md)
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, None, 400,
     "'max_tokens' must be at least 1, got 0"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 3, "max_completion_tokens": 0}, None, 400,
     "'max_completion_tokens' must be at least 1, got 0"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4-nonexistent"}, None, 404,
     "model 'gpt-4-nonexistent' is not served here; this server serves: gemma3-270m-tiny"),
    ("/v1/completions", {"prompt": "x", "model": "../../etc/passwd"}, None, 404,
     "is not served here"),
    ("/v1/completions", None, b'{"prompt": "x", "temperature": 1' + b"0" * 400 + b"}", 400,
     "'temperature' is too large"),
    ("/v1/completions", None, b'{"prompt": "x", "temperature": NaN}', 400,
     "'temperature' must be a finite number"),
    ("/v1/completions", {"prompt": "x", "seed": -1}, None, 400,
     "seed must be an integer in [0, 2**64), got -1"),
    ("/v1/completions", {"prompt": "x", "seed": -1, "stream": True}, None, 400,
     "seed must be an integer in [0, 2**64)"),
    ("/v1/completions", {"prompt": "x", "seed": 2 ** 64}, None, 400, "seed must be"),
    ("/v1/completions", None, b'{"prompt": "a\\ud800b"}', 400,
     "'prompt' is not valid Unicode text: a lone surrogate U+D800 at character 1"),
    ("/v1/chat/completions", None, b'{"messages": [{"role": "user", "content": "\\udfff"}]}',
     400, "'messages' is not valid Unicode text: a lone surrogate U+DFFF"),
    ("/v1/completions", {"prompt": "x", "stop": "z" * 100_000}, None, 400,
     "each 'stop' string must be at most 256 characters"),
    ("/v1/completions", {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, None, 400,
     "'stop' must be up to 4 non-empty strings"),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": "yes"}}, None, 400,
     "'stream_options.include_usage' must be a boolean"),
    ("/v1/completions", None, b'{"prompt": "' + b"x" * (1 << 20) + b'"}', 413,
     "over the limit of 1048576"),
    # OpenAI fields not implemented here: refused by name, never answered as if absent
    ("/v1/completions", {"prompt": "x", "logprobs": 5}, None, 400,
     "'logprobs' is not supported by this server (got 5); omit it"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": True,
                              "top_logprobs": 2}, None, 400, "'logprobs' is not supported"),
    ("/v1/completions", {"prompt": "x", "echo": True}, None, 400, "'echo' is not supported"),
    ("/v1/completions", {"prompt": "x", "best_of": 3}, None, 400, "'best_of' is not supported"),
    ("/v1/completions", {"prompt": "x", "suffix": "end"}, None, 400, "'suffix' is not supported"),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 0.5}, None, 400,
     "'presence_penalty' is not supported"),
    ("/v1/completions", {"prompt": "x", "frequency_penalty": -1}, None, 400,
     "'frequency_penalty' is not supported"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"5": 100}}, None, 400,
     "'logit_bias' is not supported"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "tools": [{"type": "function", "function": {"name": "f"}}]},
     None, 400, "'tools' is not supported"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "tool_choice": "required"}, None, 400,
     "'tool_choice' is not supported"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "response_format": {"type": "json_object"}}, None, 400,
     "'response_format' is not supported"),
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
    req = urllib.request.Request(url + "/v1/completions", data=b'{"prompt": "x"}')
    with srv.lock:
        srv.admitted += srv.max_waiting
    try:
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=60)
    finally:
        with srv.lock:
            srv.admitted -= srv.max_waiting
    assert e.value.code == 429 and e.value.headers["Retry-After"] == "1"
    assert json.loads(e.value.read())["error"]["type"] == "rate_limit_error"


def test_max_completion_tokens_and_usage_chunk(server):
    """max_completion_tokens wins over max_tokens; stream_options.include_usage adds OpenAI's
    usage chunk (no choices) before [DONE]."""
    _, url, _ = server
    base = {"prompt": "the cat", "temperature": 0}
    five = json.loads(_post(url + "/v1/completions", {**base, "max_tokens": 5})[1])
    both = json.loads(_post(url + "/v1/completions",
                            {**base, "max_tokens": 2, "max_completion_tokens": 5})[1])
    assert both["choices"][0]["text"] == five["choices"][0]["text"]
    assert both["usage"] == five["usage"]
    status, body = _post(url + "/v1/completions", {**base, "max_tokens": 5, "stream": True,
                                                   "stream_options": {"include_usage": True}})
    events = _events(body)
    assert status == 200 and events[-1]["choices"] == [] and events[-1]["usage"] == five["usage"]
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == five["choices"][0]["text"]
    status, body = _post(url + "/v1/completions", {**base, "max_tokens": 5, "stream": True})
    assert all("usage" not in e for e in _events(body))


def test_a_client_that_left_while_queued_is_not_served(server):
    """A request whose client disconnected while it waited for a slot is dropped, not run."""
    import socket
    import time
    srv, url, _ = server
    for _ in range(srv.max_concurrent):
        srv.slots.acquire()
    before = srv.stats["cancelled"]
    try:
        c = socket.create_connection(srv.server_address[:2])
        body = json.dumps({"prompt": "the", "max_tokens": 40}).encode()
        c.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: "
                  + str(len(body)).encode() + b"\r\n\r\n" + body)
        deadline = time.time() + 30
        while srv.admitted == 0 and time.time() < deadline:
            time.sleep(0.01)
        c.close()
    finally:
        for _ in range(srv.max_concurrent):
            srv.slots.release()
    deadline = time.time() + 30
    while srv.stats["cancelled"] == before and time.time() < deadline:
        time.sleep(0.01)
    assert srv.stats["cancelled"] == before + 1


def test_bursts_slowloris_and_api_key(tiny_artifacts):
    """64 connections at once are all answered (listen backlog); a client that stalls mid-request
    loses its connection after the read timeout while others are served; with an API key, /v1/*
    needs it."""
    import socket
    import time
    gen = runtime.load(tiny_artifacts("gemma3-270m-tiny"))
    srv = make_server(gen, port=0, max_concurrent=2, max_queue=100, api_key="sekret",
                      read_timeout=1.0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    try:
        slow = socket.create_connection(srv.server_address[:2])
        slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")   # ... and stalls
        results = []

        def client():
            try:
                with urllib.request.urlopen(url + "/health", timeout=60) as r:
                    results.append(r.status)
            except Exception as e:   # what a reset or refusal looks like to a client
                results.append(type(e).__name__)
        threads = [threading.Thread(target=client) for _ in range(64)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == [200] * 64
        slow.settimeout(10)
        t0 = time.time()
        assert slow.recv(100) == b""          # closed by the server, not answered
        assert time.time() - t0 < 5
        req = urllib.request.Request(url + "/v1/completions", data=b'{"prompt": "x"}')
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=60)
        assert e.value.code == 401 and "API key" in json.loads(e.value.read())["error"]["message"]
        req.add_header("Authorization", "Bearer sekret")
        with urllib.request.urlopen(req, timeout=60) as r:
            assert r.status == 200
    finally:
        srv.shutdown()
        srv.server_close()


def test_unsupported_fields_at_their_neutral_values_are_answered(server):
    """Clients that send every OpenAI field with its default value are served as without them."""
    _, url, _ = server
    neutral = {"logprobs": None, "echo": False, "best_of": 1, "suffix": "",
               "presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {}}
    plain = {"prompt": "the cat", "max_tokens": 3, "temperature": 0}
    got, body = _post(url + "/v1/completions", {**plain, **neutral})
    assert got == 200, body
    _, want = _post(url + "/v1/completions", plain)
    assert json.loads(body)["choices"] == json.loads(want)["choices"]
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "logprobs": False,
            "tools": [], "tool_choice": "none", "response_format": {"type": "text"}}
    got, body = _post(url + "/v1/chat/completions", chat)
    assert got == 200, body


def test_serve_help_explains_every_flag():
    from helpers import cli
    r = cli("runtime.serve", "--help")
    assert r.returncode == 0
    flags = re.findall(r"^  (--[a-z-]+)", r.stdout, re.M)
    assert {"--artifacts", "--target", "--host", "--port"} <= set(flags)
    # every flag's entry has a text after its name (argparse puts it on the same or next line)
    entries = re.split(r"\n  (?=-)", r.stdout.split("options:", 1)[1])
    assert all(len(e.split()) > 2 for e in entries if e.strip()), entries


def test_serve_cli_reports_bad_artifacts(tmp_path):
    r = subprocess.run([sys.executable, "-m", "runtime.serve", "--artifacts", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "has no manifest.json" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("args,message", [
    (["--max-concurrent", "0"], "argument --max-concurrent: must be >= 1, got 0"),
    (["--max-concurrent", "-1"], "argument --max-concurrent: must be >= 1, got -1"),
    (["--max-queue", "-10"], "argument --max-queue: must be >= 0, got -10"),
    (["--port", "70000"], "argument --port: must be in [0, 65535], got 70000"),
    (["--host", "0.0.0.0"], "--host 0.0.0.0 accepts connections from other machines: pass "
                            "--api-key KEY"),
])
def test_serve_cli_flags_are_validated(tmp_path, args, message):
    r = subprocess.run([sys.executable, "-m", "runtime.serve", "--artifacts", str(tmp_path)]
                       + args, capture_output=True, text=True, timeout=120,
                       env={**__import__("os").environ, "GEMMA_AOT_API_KEY": ""})
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_sigterm_drains_in_flight_requests(tiny_artifacts):
    """SIGTERM: the request in flight gets its whole answer, then the server exits 0."""
    import os
    import re
    import signal
    art = tiny_artifacts("gemma3-270m-tiny")
    p = subprocess.Popen([sys.executable, "-m", "runtime.serve", "--artifacts", str(art),
                          "--port", "0"], stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        port = None
        for line in p.stderr:
            m = re.search(r"on http://127\.0\.0\.1:(\d+)/v1", line)
            if m:
                port = int(m.group(1))
                break
        assert port, "the server never said where it listens"
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=json.dumps(
            {"prompt": "the", "max_tokens": 40, "temperature": 0, "stream": True}).encode())
        with urllib.request.urlopen(req, timeout=60) as r:
            first = r.readline()              # the stream has begun
            p.send_signal(signal.SIGTERM)
            rest = r.read().decode()
        assert first.startswith(b"data: ") and rest.rstrip().endswith("data: [DONE]")
        err = p.stderr.read()
        assert p.wait(timeout=60) == 0, err
        # (the tiny model may finish before the signal lands: 0 or 1 in flight)
        assert re.search(r"stopping: no new connections; waiting for [01] request\(s\) in "
                         r"flight", err), err
        assert "stopped\n" in err and "cut off" not in err and "Traceback" not in err
    finally:
        p.kill()


def test_draining_answers_503_and_waits_for_requests_in_flight(tiny_artifacts):
    """What SIGTERM runs (Server.drain), step by step: a request in flight (here: queued for a
    slot) still gets its answer, a new one gets 503 with Retry-After, and drain returns once
    nothing is in flight."""
    import time
    gen = runtime.load(tiny_artifacts("gemma3-270m-tiny"))
    srv = make_server(gen, port=0, max_concurrent=1, max_queue=4)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}/v1/completions"
    try:
        srv.slots.acquire()                       # the one slot is busy
        answers = []
        t = threading.Thread(target=lambda: answers.append(
            _post(url, {"prompt": "the", "max_tokens": 3, "temperature": 0})))
        t.start()
        deadline = time.time() + 30
        while srv.admitted == 0 and time.time() < deadline:
            time.sleep(0.01)
        drained = []
        d = threading.Thread(target=lambda: drained.append(srv.drain(30)))
        d.start()
        while not srv.draining:
            time.sleep(0.01)
        req = urllib.request.Request(url, data=b'{"prompt": "x"}')
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=60)
        assert e.value.code == 503 and e.value.headers["Retry-After"] == "5"
        assert "shutting down" in json.loads(e.value.read())["error"]["message"]
        assert drained == []                      # still waiting for the queued request
        srv.slots.release()
        t.join(60)
        d.join(60)
        assert answers[0][0] == 200 and drained == [True]
    finally:
        srv.shutdown()
        srv.server_close()


def test_a_backend_failure_is_an_error_not_a_dropped_connection(server, monkeypatch):
    """A backend that fails mid-generation (here: its decode raises after the first token):
    non-streaming gets a 500 in OpenAI's shape; streaming, already 200, gets an error event and
    then [DONE]; the server keeps serving."""
    _, url, gen = server
    real = gen.backend.decode
    calls = []

    def failing(*args):
        calls.append(1)
        if len(calls) > 2:
            raise RuntimeError("device lost")
        return real(*args)
    monkeypatch.setattr(gen.backend, "decode", failing)
    status, body = _post(url + "/v1/completions", {"prompt": "the", "max_tokens": 8,
                                                   "temperature": 0})
    err = json.loads(body)["error"]
    assert status == 500 and err["type"] == "server_error"
    assert err["message"] == "generation failed: RuntimeError: device lost"
    calls.clear()
    status, body = _post(url + "/v1/completions", {"prompt": "the", "max_tokens": 8,
                                                   "temperature": 0, "stream": True})
    events = _events(body)   # ends with [DONE]
    assert status == 200 and events[-1]["error"]["message"] == \
        "generation failed: RuntimeError: device lost"
    monkeypatch.setattr(gen.backend, "decode", real)
    assert _post(url + "/v1/completions", {"prompt": "the", "max_tokens": 2})[0] == 200


def _raw(srv, request: bytes) -> tuple[int, dict, bytes]:
    """(status, headers, body) of one raw HTTP/1.1 request on a fresh connection."""
    import http.client
    import socket
    s = socket.create_connection(srv.server_address[:2], timeout=30)
    try:
        s.sendall(request)
        r = http.client.HTTPResponse(s)
        r.begin()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        s.close()


def test_protocol_edges(tiny_artifacts):
    """Reliability cases (issue 36): the Authorization scheme is case-insensitive; a request with
    both Content-Length and Transfer-Encoding is refused (smuggling); PUT/DELETE/PATCH get an
    OpenAI-style 405, not HTML; GET /v1/models/{id} answers for a served model and 404s others;
    accepted sockets have TCP_NODELAY (no Nagle delay on keep-alive connections)."""
    import socket
    gen = runtime.load(tiny_artifacts("gemma3-270m-tiny"))
    srv = make_server(gen, port=0, api_key="sekret")
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    body = b'{"prompt": "the", "max_tokens": 2}'
    try:
        for scheme in ("Bearer", "bearer", "BEARER"):
            status, _, _ = _raw(srv, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                                     b"Authorization: " + scheme.encode() + b" sekret\r\n"
                                     b"Content-Length: %d\r\n\r\n" % len(body) + body)
            assert status == 200, scheme
        status, _, out = _raw(srv, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                                   b"Authorization: Basic sekret\r\n"
                                   b"Content-Length: %d\r\n\r\n" % len(body) + body)
        assert status == 401
        status, _, out = _raw(srv, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                                   b"Authorization: Bearer sekret\r\nTransfer-Encoding: chunked\r\n"
                                   b"Content-Length: %d\r\n\r\n" % len(body) + body)
        assert status == 400 and json.loads(out)["error"]["message"] == (
            "a request with both Content-Length and Transfer-Encoding is refused; send the body "
            "with Content-Length only")
        for method in ("PUT", "DELETE", "PATCH"):
            status, headers, out = _raw(srv, method.encode() + b" /v1/completions HTTP/1.1\r\n"
                                                              b"Host: x\r\nContent-Length: 0\r\n\r\n")
            assert status == 405 and headers["allow"] == "GET, POST", method
            assert headers["content-type"] == "application/json"
            assert json.loads(out)["error"]["message"] == \
                f"method {method} is not allowed on /v1/completions; use GET or POST"
        auth = b"Authorization: Bearer sekret\r\n"
        status, _, out = _raw(srv, b"GET /v1/models/gemma3-270m-tiny HTTP/1.1\r\nHost: x\r\n"
                                   + auth + b"\r\n")
        assert status == 200 and json.loads(out)["id"] == "gemma3-270m-tiny"
        status, _, out = _raw(srv, b"GET /v1/models/other HTTP/1.1\r\nHost: x\r\n" + auth +
                                   b"\r\n")
        assert status == 404 and json.loads(out)["error"]["message"] == \
            "model 'other' is not served here; served: gemma3-270m-tiny"
        s = socket.create_connection(srv.server_address[:2], timeout=30)
        try:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            s.recv(1 << 16)
            # the server's end of this connection: among the live sockets, the accepted ones
            import gc

            def local(o):   # a socket another thread closes meanwhile has no address any more
                try:
                    return o.getsockname()
                except OSError:
                    return None
            handlers = [o for o in gc.get_objects() if isinstance(o, socket.socket)
                        and o.fileno() != -1 and local(o) == srv.server_address[:2]
                        and o is not srv.socket]
            assert handlers and all(h.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
                                    for h in handlers)
        finally:
            s.close()
    finally:
        srv.shutdown()
        srv.server_close()
