"""`python -m runtime.serve`: an OpenAI-compatible HTTP server on any backend.

Completions stream through the generator (`Generator.stream_text`: stop tokens, stop strings,
UTF-8 hold-back, per-request stats); this module only speaks HTTP.

Endpoints: POST /v1/completions, POST /v1/chat/completions (both with "stream": true as
server-sent events), GET /v1/models, GET /health. One loaded Generator serves every request;
up to --max-concurrent generations run at once, up to --max-queue more wait, and any beyond that
get 429. Bad requests get a 4xx JSON error in OpenAI's shape and the server keeps serving.
Defaults follow OpenAI's API (max_tokens 16, temperature 1); `top_k` is an extension.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from . import sampling


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
    "stop": ((str, list), "a string or a list of strings"),
    "n": ((int,), "an integer"),
}


def parse_request(body: bytes, chat: bool, gen) -> dict:
    try:
        req = json.loads(body or b"")
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(f"malformed JSON body: {e}") from None
    if not isinstance(req, dict):
        raise RequestError("the request body must be a JSON object")
    for name, value in req.items():
        if name in _FIELDS and value is not None:
            types, what = _FIELDS[name]
            if isinstance(value, bool) and bool not in types or not isinstance(value, types):
                raise RequestError(f"'{name}' must be {what}, got {json.dumps(value)[:60]}",
                                   param=name)
    key = "messages" if chat else "prompt"
    if req.get(key) is None:
        raise RequestError(f"'{key}' is required", param=key)
    if req.get("n") not in (None, 1):
        raise RequestError("only n=1 is supported", param="n")
    stop = req.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise RequestError("'stop' must be up to 4 non-empty strings", param="stop")
    max_tokens = req.get("max_completion_tokens") or req.get("max_tokens") or 16
    if max_tokens < 1:
        raise RequestError("'max_tokens' must be at least 1", param="max_tokens")
    temperature = 1.0 if req.get("temperature") is None else float(req["temperature"])
    top_p = req.get("top_p")
    try:
        sampling.validate(temperature, req.get("top_k"), top_p)
    except ValueError as e:
        raise RequestError(str(e)) from None
    try:
        ids = gen.tokenizer.prompt_ids(req[key], chat=chat)
    except (ValueError, TypeError) as e:
        raise RequestError(str(e), param=key) from None
    if len(ids) + max_tokens > gen.max_context:
        raise RequestError(f"prompt of {len(ids)} tokens + max_tokens {max_tokens} exceeds the "
                           f"model's context of {gen.max_context} tokens",
                           param=key, code="context_length_exceeded")
    return {"ids": ids, "max_tokens": max_tokens, "temperature": temperature, "top_p": top_p,
            "top_k": req.get("top_k"), "seed": req.get("seed"), "stop": stop,
            "stream": bool(req.get("stream"))}


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, addr, gen, max_concurrent: int, max_queue: int):
        super().__init__(addr, Handler)
        self.gen = gen
        self.slots = threading.Semaphore(max_concurrent)
        self.max_waiting = max_concurrent + max_queue
        self.admitted = 0
        self.lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Server

    def log_message(self, fmt, *args):   # one line per request on stderr
        sys.stderr.write(f"{self.address_string()} {fmt % args}\n")

    def _json(self, status: int, payload: dict):
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, e: RequestError):
        self._json(e.status, {"error": {"message": str(e), "type": "invalid_request_error"
                                        if e.status < 500 else "server_error",
                                        "param": e.param, "code": e.code}})

    def do_GET(self):
        gen = self.server.gen
        if self.path == "/health":
            self._json(200, {"status": "ok", "model": gen.manifest.variant, "target": gen.target})
        elif self.path == "/v1/models":
            self._json(200, {"object": "list", "data": [{
                "id": gen.manifest.variant, "object": "model", "created": 0,
                "owned_by": "gemma-aot"}]})
        else:
            self._error(RequestError(f"no route GET {self.path}", 404))

    def do_POST(self):
        routes = {"/v1/completions": False, "/v1/chat/completions": True}
        if self.path not in routes:
            self._error(RequestError(f"no route POST {self.path}", 404))
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= 8 << 20:
            self._error(RequestError("missing or invalid Content-Length (max 8 MiB)", 411))
            return
        body = self.rfile.read(length)
        chat = routes[self.path]
        srv = self.server
        try:
            r = parse_request(body, chat, srv.gen)
        except RequestError as e:
            self._error(e)
            return
        with srv.lock:
            if srv.admitted >= srv.max_waiting:
                self._error(RequestError("too many requests in flight; retry later", 429))
                return
            srv.admitted += 1
        try:
            with srv.slots:
                self._respond(r, chat)
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            with srv.lock:
                srv.admitted -= 1

    def _respond(self, r: dict, chat: bool):
        gen = self.server.gen
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        model = gen.manifest.variant
        obj = "chat.completion" if chat else "text_completion"

        def choice(text, finish, stream=False):
            """One choice object; in a chat stream, text None means the closing delta."""
            if not chat:
                return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            if not stream:
                return {"index": 0, "message": {"role": "assistant", "content": text},
                        "finish_reason": finish}
            return {"index": 0, "delta": {} if text is None else {"content": text},
                    "finish_reason": finish}

        run = gen.stream_text(r["ids"], r["max_tokens"], r["temperature"], r["top_k"], r["top_p"],
                              r["seed"], r["stop"])
        if not r["stream"]:
            text = "".join(run)
            n = run.stats["generated_tokens"]
            self._json(200, {"id": rid, "object": obj, "created": created, "model": model,
                             "choices": [choice(text, run.stats["finish_reason"])],
                             "usage": {"prompt_tokens": len(r["ids"]), "completion_tokens": n,
                                       "total_tokens": len(r["ids"]) + n}})
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        chunk_obj = "chat.completion.chunk" if chat else "text_completion"

        def send(payload):
            self.wfile.write(f"data: {json.dumps(payload)}\n\n".encode())
            self.wfile.flush()

        if chat:
            send({"id": rid, "object": chunk_obj, "created": created, "model": model,
                  "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]})
        try:
            for piece in run:
                send({"id": rid, "object": chunk_obj, "created": created, "model": model,
                      "choices": [choice(piece, None, stream=True)]})
        finally:   # a client that went away stops the generation
            run.close()
        send({"id": rid, "object": chunk_obj, "created": created, "model": model,
              "choices": [choice(None, run.stats["finish_reason"], stream=True)]})
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


def make_server(gen, host="127.0.0.1", port=8000, max_concurrent=4, max_queue=16) -> Server:
    return Server((host, port), gen, max_concurrent, max_queue)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m runtime.serve",
                                description="OpenAI-compatible HTTP server for a gemma-aot artifact.")
    p.add_argument("--artifacts", required=True)
    p.add_argument("--target", default="auto")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-concurrent", type=int, default=4,
                   help="generations running at once (default 4)")
    p.add_argument("--max-queue", type=int, default=16,
                   help="requests waiting beyond those; more get 429 (default 16)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip checking the files' sha256 against the manifest (sizes are still "
                        "checked)")
    p.add_argument("--trust-executables", action="store_true",
                   help="xla-tpu: load its pickle-based executables even though no seal of your "
                        "key vouches for the manifest (only if you trust everyone who can write "
                        "the artifact directory)")
    args = p.parse_args(argv)
    import runtime
    try:
        gen = runtime.load(args.artifacts, target=args.target, verify=not args.no_verify,
                           trust_executables=args.trust_executables,
                           log=lambda m: print(m, file=sys.stderr))
        srv = make_server(gen, args.host, args.port, args.max_concurrent, args.max_queue)
    except (runtime.ArtifactError, RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"serving {gen.manifest.variant} ({gen.target}) on http://{args.host}:"
          f"{srv.server_address[1]}/v1 — up to {args.max_concurrent} at once", file=sys.stderr)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        srv.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
