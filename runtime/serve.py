"""`python -m runtime.serve`: an OpenAI-compatible HTTP server on any backend.

Completions stream through the generator (`Generator.stream_text`: stop tokens, stop strings,
UTF-8 hold-back, per-request stats); this module only speaks HTTP.

Endpoints: POST /v1/completions, POST /v1/chat/completions (both with "stream": true as
server-sent events), GET /v1/models, GET /health. One loaded Generator serves every request;
up to --max-concurrent generations run at once, up to --max-queue more wait, and any beyond that
get 429 with Retry-After (503 while draining after SIGTERM). Bad requests get a 4xx JSON error in
OpenAI's shape (inside a stream: an `error` event, then `[DONE]`) and the server keeps serving.
Defaults follow OpenAI's API (max_tokens 16, temperature 1); `top_k` is an extension.

Adapters are models, as OpenAI names fine-tuned models: an artifact's run-time LoRA adapters
(`runtime.adapters`) are served as `"model": "<variant>:<adapter>"` beside the base
`"<variant>"`, all listed by /v1/models; `lora_scale` (an extension) scales the named adapter for
that request. Each request runs its own adapter on the one loaded backend, so requests with
different adapters run at once without affecting each other. An unknown model is a 404 naming
those served.

Holding load: a generation stops as soon as its client goes away (a failed write when
streaming; a closed socket, checked between tokens, when not); the listen backlog is
`LISTEN_BACKLOG`; each connection has a read timeout (`--read-timeout`), so a client that
stalls mid-request (slowloris) loses its connection, not a generation slot; request bodies are
limited to `MAX_BODY`; stop strings to `MAX_STOP` of `MAX_STOP_CHARS` characters. SIGTERM stops
accepting, lets in-flight requests finish (up to `--drain-timeout`), then exits. `--api-key`
(or $GEMMA_AOT_API_KEY) requires `Authorization: Bearer KEY` on /v1/*; it is required when
binding to anything but loopback.
"""

from __future__ import annotations

import argparse
import hmac
import ipaddress
import json
import math
import os
import select
import signal
import socket
import sys
import threading
import time
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from . import integrity, sampling

LISTEN_BACKLOG = 256
MAX_BODY = 1 << 20            # bytes of a request body
MAX_STOP = 4                  # stop strings per request (OpenAI's limit)
MAX_STOP_CHARS = 256          # characters per stop string (each is searched for after each token)
API_KEY_ENV = "GEMMA_AOT_API_KEY"


class RequestError(Exception):
    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


_NUMBER = (int, float)
_FIELDS = {   # field -> (accepted types, description for the error)
    "model": ((str,), "a string"),
    "prompt": ((str,), "a string"),
    "messages": ((list,), "a list of messages"),
    "max_tokens": ((int,), "an integer"),
    "max_completion_tokens": ((int,), "an integer"),
    "temperature": (_NUMBER, "a number"),
    "top_p": (_NUMBER, "a number"),
    "top_k": ((int,), "an integer"),
    "seed": ((int,), "an integer"),
    "stream": ((bool,), "a boolean"),
    "stream_options": ((dict,), "an object"),
    "stop": ((str, list), "a string or a list of strings"),
    "n": ((int,), "an integer"),
    "lora_scale": (_NUMBER, "a number"),
}


# OpenAI fields this server does not implement, with the values that ask for nothing (sent by
# clients that fill in every default). Any other value is refused by name: answering as if the
# field were absent would give the client something other than what it asked for.
_UNSUPPORTED = {
    "logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False),
    "best_of": (None, 1), "suffix": (None, ""), "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0), "logit_bias": (None, {}), "tools": (None, []),
    "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
}


def _refuse_unsupported(req: dict) -> None:
    for name, neutral in _UNSUPPORTED.items():
        value = req.get(name)
        if not any(value == v and type(value) is not bool or value is v for v in neutral):
            raise RequestError(f"'{name}' is not supported by this server (got "
                               f"{json.dumps(value)[:60]}); omit it: an answer that ignored it "
                               f"would not be what was asked for", param=name,
                               code="unsupported_parameter")


def _text_ok(value, name: str) -> None:
    """Strings the tokenizer can take: valid Unicode (JSON can carry lone surrogates)."""
    texts = [value] if isinstance(value, str) else []
    if isinstance(value, list):   # chat messages
        texts = [m.get("content") for m in value if isinstance(m, dict)]
        texts = [t for t in texts if isinstance(t, str)]
    for t in texts:
        try:
            t.encode("utf-8")
        except UnicodeEncodeError as e:
            raise RequestError(f"'{name}' is not valid Unicode text: a lone surrogate "
                               f"U+{ord(t[e.start]):04X} at character {e.start}",
                               param=name) from None


def _number(req: dict, name: str, default):
    """A finite float from a JSON number (a 400-digit integer or NaN is a 400, not a crash)."""
    v = req.get(name)
    if v is None:
        return default
    try:
        f = float(v)
    except OverflowError:
        raise RequestError(f"'{name}' is too large: {str(v)[:20]}...", param=name) from None
    if not math.isfinite(f):
        raise RequestError(f"'{name}' must be a finite number, got {v!r}", param=name)
    return f


def _json_object(body: bytes) -> dict:
    """The body as a JSON object whose known fields have their types."""
    try:
        req = json.loads(body or b"")
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise RequestError(f"malformed JSON body: {e}") from None
    if not isinstance(req, dict):
        raise RequestError("the request body must be a JSON object")
    for name, value in req.items():
        if name in _FIELDS and value is not None:
            types, what = _FIELDS[name]
            if isinstance(value, bool) and bool not in types or not isinstance(value, types):
                raise RequestError(f"'{name}' must be {what}, got {json.dumps(value)[:60]}",
                                   param=name)
    return req


def _adapter(req: dict, gen, served: tuple[str, ...]):
    """(adapter, lora_scale) of the request's model: "<base>:<adapter>" names a run-time LoRA
    adapter, "<base>" the base model; no model: the server's default (its --adapter, else the
    base)."""
    model = req.get("model")
    if served and model is not None and model not in served:
        raise RequestError(f"model {model[:100]!r} is not served here; this server serves: "
                           f"{', '.join(served)}", 404, param="model", code="model_not_found")
    adapter = ADAPTER_DEFAULT
    if model is not None and served:
        adapter = model.split(":", 1)[1] if ":" in model else None
    lora_scale = _number(req, "lora_scale", 1.0)
    if req.get("lora_scale") is not None and (adapter is None or
                                              adapter is ADAPTER_DEFAULT and gen.adapter is None):
        raise RequestError("'lora_scale' applies to an adapter; name one as model "
                           "'<base>:<adapter>'", param="lora_scale")
    return adapter, lora_scale


def _stop_strings(req: dict) -> list[str]:
    stop = req.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not all(isinstance(s, str) and s for s in stop) or len(stop) > MAX_STOP:
        raise RequestError(f"'stop' must be up to {MAX_STOP} non-empty strings", param="stop")
    if any(len(s) > MAX_STOP_CHARS for s in stop):
        raise RequestError(f"each 'stop' string must be at most {MAX_STOP_CHARS} characters",
                           param="stop")
    for s_ in stop:
        _text_ok(s_, "stop")
    return stop


def _max_tokens(req: dict) -> int:
    # max_completion_tokens is OpenAI's current name; it wins over the deprecated max_tokens
    name = "max_completion_tokens" if req.get("max_completion_tokens") is not None \
        else "max_tokens"
    max_tokens = req.get(name)
    if max_tokens is None:
        return 16
    if max_tokens < 1:
        raise RequestError(f"'{name}' must be at least 1, got {max_tokens}", param=name)
    return max_tokens


def _sampling(req: dict) -> dict:
    temperature = _number(req, "temperature", 1.0)
    top_p = _number(req, "top_p", None)
    try:
        sampling.validate(temperature, req.get("top_k"), top_p)
    except ValueError as e:
        raise RequestError(str(e)) from None
    try:
        seed = sampling.check_seed(req.get("seed"))
    except ValueError as e:
        raise RequestError(str(e), param="seed") from None
    return {"temperature": temperature, "top_p": top_p, "top_k": req.get("top_k"), "seed": seed}


def parse_request(body: bytes, chat: bool, gen, served: tuple[str, ...] = ()) -> dict:
    """The generation a completion request asks for, every field checked (RequestError)."""
    req = _json_object(body)
    _refuse_unsupported(req)
    adapter, lora_scale = _adapter(req, gen, served)
    key = "messages" if chat else "prompt"
    if req.get(key) is None:
        raise RequestError(f"'{key}' is required", param=key)
    _text_ok(req[key], key)
    if req.get("n") not in (None, 1):
        raise RequestError("only n=1 is supported", param="n")
    stop = _stop_strings(req)
    max_tokens = _max_tokens(req)
    sampled = _sampling(req)
    options = req.get("stream_options") or {}
    if not isinstance(options.get("include_usage", False), bool):
        raise RequestError("'stream_options.include_usage' must be a boolean",
                           param="stream_options")
    try:
        ids = gen.tokenizer.prompt_ids(req[key], chat=chat)
    except (ValueError, TypeError) as e:
        raise RequestError(str(e), param=key) from None
    if len(ids) + max_tokens > gen.max_context:
        raise RequestError(f"prompt of {len(ids)} tokens + max_tokens {max_tokens} exceeds the "
                           f"model's context of {gen.max_context} tokens",
                           param=key, code="context_length_exceeded")
    model = req.get("model")
    return {"ids": ids, "max_tokens": max_tokens, **sampled, "stop": stop,
            "stream": bool(req.get("stream")),
            "include_usage": bool(options.get("include_usage")),
            "adapter": adapter, "lora_scale": lora_scale,
            "model": model if model is not None else model_id(gen, gen.adapter)}


ADAPTER_DEFAULT = object()   # the request names no model: the generator's own adapter


def model_id(gen, adapter) -> str:
    """The OpenAI model name of the base (`<variant>`) or one of its adapters
    (`<variant>:<adapter>`)."""
    return gen.manifest.variant + (f":{adapter}" if isinstance(adapter, str) else "")


def _model_object(name: str) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": "gemma-aot"}


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = LISTEN_BACKLOG   # socketserver's default of 5 reset bursts of clients

    def __init__(self, addr, gen, max_concurrent: int, max_queue: int, api_key: str | None = None,
                 read_timeout: float = 30.0):
        if max_concurrent < 1 or max_queue < 0:
            raise ValueError(f"max_concurrent must be >= 1 and max_queue >= 0, got "
                             f"{max_concurrent} and {max_queue}")
        super().__init__(addr, Handler)
        self.gen = gen
        self.served = (model_id(gen, None),) + tuple(model_id(gen, a) for a in gen.adapters)
        for a in gen.adapters:   # each adapter read, checked and prepared now, not mid-request
            gen.with_adapter(a)
        self.slots = threading.Semaphore(max_concurrent)
        self.max_concurrent = max_concurrent
        self.max_waiting = max_concurrent + max_queue
        self.admitted = 0
        self.lock = threading.Lock()
        self.idle = threading.Condition(self.lock)
        self.draining = False
        self.api_key = api_key
        self.read_timeout = read_timeout
        self.stats = {"cancelled": 0}

    def count_cancelled(self) -> None:
        """A generation stopped (or never started) because its client went away."""
        with self.lock:
            self.stats["cancelled"] += 1

    def drain(self, timeout: float) -> bool:
        """Stops admitting requests (503) and waits until those in flight are done; True when
        they all finished within `timeout` seconds."""
        with self.lock:
            self.draining = True
            return self.idle.wait_for(lambda: self.admitted == 0, timeout)


def client_gone(sock) -> bool:
    """True when the peer closed the connection (readable with nothing to read). A pipelined
    next request is data, not a close."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable:
            return False
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Server

    def setup(self):
        self.timeout = self.server.read_timeout   # per socket operation: slowloris loses
        super().setup()
        # small responses and stream events go out at once: with Nagle's algorithm a reused
        # (keep-alive) connection waited ~40 ms for the client's delayed ACK on every request
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, fmt, *args):   # one line per request on stderr
        sys.stderr.write(f"{self.address_string()} {fmt % args}\n")

    def _json(self, status: int, payload: dict, headers: dict | None = None):
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    @staticmethod
    def _error_body(e: "RequestError") -> dict:
        kind = {401: "authentication_error", 404: "invalid_request_error",
                429: "rate_limit_error", 503: "server_error"}.get(
            e.status, "invalid_request_error" if e.status < 500 else "server_error")
        return {"error": {"message": str(e), "type": kind, "param": e.param, "code": e.code}}

    def _error(self, e: RequestError, headers: dict | None = None):
        if e.status in (408, 411, 413):
            self.close_connection = True   # the body was not read: the stream is out of step
        self._json(e.status, self._error_body(e), headers)

    def _authorized(self) -> bool:
        key = self.server.api_key
        if not key:
            return True
        scheme, _, token = self.headers.get("Authorization", "").strip().partition(" ")
        # the scheme name is case-insensitive (RFC 7235 section 2.1)
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(),
                                                              key.encode()):
            return True
        self._error(RequestError("missing or wrong API key (send 'Authorization: Bearer KEY')",
                                 401, code="invalid_api_key"))
        return False

    def do_GET(self):
        gen = self.server.gen
        if self.path == "/health":
            srv = self.server
            with srv.lock:
                state = {"status": "draining" if srv.draining else "ok",
                         "model": gen.manifest.variant, "target": gen.target,
                         "max_context": gen.max_context, "in_flight": srv.admitted,
                         "cancelled": srv.stats["cancelled"], "adapters": gen.adapters}
            self._json(200, state)
        elif self.path == "/v1/models":
            if self._authorized():
                self._json(200, {"object": "list", "data": [
                    _model_object(name) for name in self.server.served]})
        elif self.path.startswith("/v1/models/"):
            if self._authorized():
                name = urllib.parse.unquote(self.path[len("/v1/models/"):])
                if name in self.server.served:
                    self._json(200, _model_object(name))
                else:
                    self._error(RequestError(
                        f"model {name[:200]!r} is not served here; served: "
                        f"{', '.join(self.server.served)}", 404, code="model_not_found"))
        else:
            self._error(RequestError(f"no route GET {self.path[:200]}", 404))

    def _not_allowed(self):
        """PUT, DELETE, PATCH: an OpenAI-style 405 (the standard handler answers HTML 501)."""
        self.close_connection = True   # its body, if any, is not read
        self._error(RequestError(f"method {self.command} is not allowed on {self.path[:200]}; "
                                 f"use GET or POST", 405), {"Allow": "GET, POST"})

    do_PUT = do_DELETE = do_PATCH = _not_allowed

    def _body(self) -> bytes | None:
        """The request body by its Content-Length, or None after answering (or dropping) a
        request whose body cannot be read."""
        if self.headers.get("Transfer-Encoding") is not None and \
                self.headers.get("Content-Length") is not None:
            # two framings: a proxy may read the body by one and this server by the other
            # (request smuggling, RFC 9112 section 6.1)
            self.close_connection = True
            self._error(RequestError("a request with both Content-Length and Transfer-Encoding "
                                     "is refused; send the body with Content-Length only", 400))
            return None
        try:
            length = int(self.headers.get("Content-Length") or -1)
        except ValueError:
            length = -1
        if length < 0:
            self._error(RequestError("missing or invalid Content-Length", 411))
            return None
        if length > MAX_BODY:
            # read (and drop) a body up to 16x the limit first: closing on a client that is still
            # sending resets the connection, and it would see that instead of the 413
            if length <= 16 * MAX_BODY:
                self._drop(length)
            self._error(RequestError(f"request body of {length} bytes is over the limit of "
                                     f"{MAX_BODY}", 413))
            return None
        try:
            body = self.rfile.read(length)
        except (TimeoutError, socket.timeout):
            body = b""
        if len(body) < length:   # the client stalled or went away mid-body
            self.close_connection = True
            return None
        return body

    def _drop(self, length: int) -> None:
        try:
            while length > 0:
                got = self.rfile.read(min(length, 1 << 16))
                if not got:
                    return
                length -= len(got)
        except (TimeoutError, socket.timeout, OSError):
            pass

    def _admit(self) -> bool:
        """Counts the request in, or answers 503 (draining) / 429 (full) and returns False."""
        srv = self.server
        with srv.lock:
            if srv.draining:
                self._error(RequestError("the server is shutting down; retry on another "
                                         "instance", 503), {"Retry-After": "5"})
                return False
            if srv.admitted >= srv.max_waiting:
                self._error(RequestError("too many requests in flight; retry later", 429),
                            {"Retry-After": "1"})
                return False
            srv.admitted += 1
            return True

    def do_POST(self):
        routes = {"/v1/completions": False, "/v1/chat/completions": True}
        if self.path not in routes:
            self.close_connection = True   # its body, if any, is not read
            self._error(RequestError(f"no route POST {self.path[:200]}", 404))
            return
        if not self._authorized():
            self.close_connection = True
            return
        body = self._body()
        if body is None:
            return
        chat = routes[self.path]
        srv = self.server
        try:
            r = parse_request(body, chat, srv.gen, srv.served)
        except RequestError as e:
            self._error(e)
            return
        if not self._admit():
            return
        try:
            with srv.slots:
                if client_gone(self.connection):   # left while it waited for a slot
                    srv.count_cancelled()
                    self.close_connection = True
                    return
                self._respond(r, _Reply(r, chat))
        except (BrokenPipeError, ConnectionResetError, TimeoutError, socket.timeout):
            self.close_connection = True
        finally:
            with srv.lock:
                srv.admitted -= 1
                srv.idle.notify_all()

    def _respond(self, r: dict, reply: "_Reply"):
        gen = self.server.gen
        adapter = {} if r["adapter"] is ADAPTER_DEFAULT and r["lora_scale"] == 1.0 else \
            {"adapter": gen.adapter if r["adapter"] is ADAPTER_DEFAULT else r["adapter"],
             "adapter_scale": r["lora_scale"]}
        try:
            run = gen.stream_text(r["ids"], r["max_tokens"], r["temperature"], r["top_k"],
                                  r["top_p"], r["seed"], r["stop"], **adapter)
        except (ValueError, TypeError) as e:
            self._error(RequestError(str(e)))
            return
        if r["stream"]:
            self._stream(run, reply)
        else:
            self._whole(run, reply)

    def _whole(self, run, reply: "_Reply"):
        """The completion in one JSON response, once generated."""
        pieces = []
        try:
            for i, piece in enumerate(run):
                pieces.append(piece)
                if i % 4 == 3 and client_gone(self.connection):   # nobody to answer
                    self.server.count_cancelled()
                    self.close_connection = True
                    return
        except Exception as e:   # the backend failed: a 500 in OpenAI's shape, not a drop
            sys.stderr.write(f"generation failed: {type(e).__name__}: {e}\n")
            self._error(RequestError(f"generation failed: {type(e).__name__}: {e}", 500))
            return
        finally:
            run.close()
        self._json(200, reply.whole("".join(pieces), run))

    def _stream(self, run, reply: "_Reply"):
        """The completion as server-sent events, a chunk per piece of text, then [DONE]."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

        def send(payload):
            self.wfile.write(f"data: {json.dumps(payload)}\n\n".encode())
            self.wfile.flush()

        if reply.chat:
            send(reply.chunk([{"index": 0, "delta": {"role": "assistant"},
                               "finish_reason": None}]))
        try:
            for piece in run:
                send(reply.chunk([reply.choice(piece, None, stream=True)]))
        except (BrokenPipeError, ConnectionResetError, TimeoutError, socket.timeout):
            self.server.count_cancelled()
            raise
        except Exception as e:   # after the 200: the error goes in the stream, then [DONE]
            sys.stderr.write(f"generation failed: {type(e).__name__}: {e}\n")
            send(self._error_body(RequestError(f"generation failed: {type(e).__name__}: {e}",
                                               500)))
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
            return
        finally:   # a client that went away stops the generation
            run.close()
        send(reply.chunk([reply.choice(None, run.stats["finish_reason"], stream=True)]))
        if reply.include_usage:   # OpenAI's usage chunk: no choices
            send(reply.chunk([], usage=reply.usage(run)))
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


class _Reply:
    """The OpenAI response objects of one completion request (plain or chat, whole or
    streamed)."""

    def __init__(self, r: dict, chat: bool):
        self.chat, self.model, self.include_usage = chat, r["model"], r["include_usage"]
        self.prompt_tokens = len(r["ids"])
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def choice(self, text, finish, stream=False) -> dict:
        """One choice object; in a chat stream, text None means the closing delta."""
        if not self.chat:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        if not stream:
            return {"index": 0, "message": {"role": "assistant", "content": text},
                    "finish_reason": finish}
        return {"index": 0, "delta": {} if text is None else {"content": text},
                "finish_reason": finish}

    def usage(self, run) -> dict:
        n = run.stats["generated_tokens"]
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": n,
                "total_tokens": self.prompt_tokens + n}

    def whole(self, text: str, run) -> dict:
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model,
                "choices": [self.choice(text, run.stats["finish_reason"])],
                "usage": self.usage(run)}

    def chunk(self, choices, **extra) -> dict:
        return {"id": self.id,
                "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices, **extra}


def make_server(gen, host="127.0.0.1", port=8000, max_concurrent=4, max_queue=16,
                api_key: str | None = None, read_timeout: float = 30.0) -> Server:
    return Server((host, port), gen, max_concurrent, max_queue, api_key, read_timeout)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _int_in(lo: int, hi: int | None = None):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < lo or hi is not None and v > hi:
            raise argparse.ArgumentTypeError(
                f"must be {'in [%d, %d]' % (lo, hi) if hi is not None else '>= %d' % lo}, "
                f"got {v}")
        return v
    return parse


def _seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return v


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m runtime.serve",
                                description="OpenAI-compatible HTTP server for a gemma-aot artifact.")
    p.add_argument("--artifacts", required=True,
                   help="the artifact directory (what compile.export wrote: manifest.json and "
                        "one folder per target)")
    p.add_argument("--target", default="auto",
                   help="which of its targets to serve (xla, xla-tpu, tflite, onnx); default: "
                        "auto, the one that suits this machine (runtime.info shows the choice)")
    p.add_argument("--adapter", default=None,
                   help="the run-time LoRA adapter for requests that name no model (default: "
                        "the base); every adapter of the artifact is served as "
                        "'<variant>:<adapter>' either way")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1, this machine only; any other "
                        "address requires --api-key)")
    p.add_argument("--port", type=_int_in(0, 65535), default=8000,
                   help="TCP port (default 8000; 0 picks a free one)")
    p.add_argument("--max-concurrent", type=_int_in(1), default=4,
                   help="generations running at once (default 4)")
    p.add_argument("--max-queue", type=_int_in(0), default=16,
                   help="requests waiting beyond those; more get 429 (default 16)")
    p.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on /v1/* (default: ${API_KEY_ENV}); "
                        f"required when --host is not a loopback address")
    p.add_argument("--read-timeout", type=_seconds, default=30.0,
                   help="seconds a connection may stall while sending its request (default 30)")
    p.add_argument("--drain-timeout", type=_seconds, default=60.0,
                   help="on SIGTERM, seconds to let in-flight requests finish (default 60)")
    integrity.add_arguments(p)
    return p


def main(argv=None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if not is_loopback(args.host) and not api_key:
        p.error(f"--host {args.host} accepts connections from other machines: pass --api-key KEY "
                f"(or set ${API_KEY_ENV}) so that only clients with the key are served")
    import runtime
    try:
        gen = runtime.load(args.artifacts, target=args.target, adapter=args.adapter,
                           **integrity.load_options(args))
        srv = make_server(gen, args.host, args.port, args.max_concurrent, args.max_queue,
                          api_key, args.read_timeout)
    except (runtime.ArtifactError, RuntimeError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    def _terminate(signum, frame):   # drain in another thread: shutdown() waits for the loop
        threading.Thread(target=srv.shutdown, daemon=True).start()
    signal.signal(signal.SIGTERM, _terminate)
    print(f"serving {', '.join(srv.served)} ({gen.target}) on http://{args.host}:"
          f"{srv.server_address[1]}/v1 — up to {args.max_concurrent} at once, "
          f"{args.max_queue} waiting" + (", API key required" if api_key else ""),
          file=sys.stderr, flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        with srv.lock:
            busy = srv.admitted
        srv.server_close()   # the listening socket: no new connections
        print(f"stopping: no new connections; waiting for {busy} request(s) in flight (up to "
              f"{args.drain_timeout:g} s)", file=sys.stderr, flush=True)
        done = srv.drain(args.drain_timeout)
        print("stopped" + ("" if done else f"; {srv.admitted} request(s) were cut off"),
              file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
