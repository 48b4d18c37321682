"""`python -m benchmarks.load`: the HTTP server under load, over real sockets on loopback.

    python -m benchmarks.load [--artifacts artifacts/gemma3-270m] [--target auto]
        [--clients 64] [--disconnect 10] [--slowloris 1] [--max-tokens 32]
        [--max-concurrent 4] [--max-queue 128] [--threads 2] [--out benchmarks/results]

Starts `python -m runtime.serve` as its own process, then:
1. sequential: each of --clients greedy requests (distinct prompts cut from the evaluation text,
   half of them chat, half streaming) alone, one after another: the answers every later run must
   equal, and the unloaded latency;
2. load: all --clients requests at once (released by one barrier), while --disconnect clients
   send long non-streaming requests and close their sockets after 0.5 s, and --slowloris
   connections send half a request and then one header byte every 5 s.
Reports throughput (completion tokens per second of the load phase), latency p50/p99 (whole
answer; and first streamed event for streaming clients) for both phases, errors by kind, how many
answers differ from the sequential ones, and the server's own count of generations it stopped
because their client left (`/health`). Writes `load.json` under --out.
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import json
import os
import platform
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def prompts(n: int) -> list[dict]:
    """n distinct requests: prompts cut from the evaluation text (prose, code, Chinese, Russian,
    chat), alternately plain and chat, alternately streaming; greedy, so answers are exact."""
    from compile import quality
    pieces = []
    for _, body in quality.sections():
        words = body.split()
        for i in range(0, max(1, len(words) - 12), 12):
            pieces.append(" ".join(words[i:i + 12]))
    out = []
    for i in range(n):
        text = pieces[(i * 7) % len(pieces)]
        chat = i % 2 == 1
        req = {"temperature": 0, "stream": i % 4 >= 2}
        if chat:
            req["messages"] = [{"role": "user", "content": text}]
        else:
            req["prompt"] = text
        out.append((chat, req))
    return out


def call(port: int, chat: bool, req: dict, timeout: float = 600) -> dict:
    """One request; returns text, latency, first-event latency (streaming), tokens, or error."""
    path = "/v1/chat/completions" if chat else "/v1/completions"
    t0 = time.perf_counter()
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        c.request("POST", path, json.dumps(req), {"Content-Type": "application/json"})
        r = c.getresponse()
        if r.status != 200:
            body = r.read()
            return {"error": f"HTTP {r.status}", "detail": body[:200].decode(errors="replace")}
        if not req.get("stream"):
            d = json.loads(r.read())
            ch = d["choices"][0]
            text = ch["message"]["content"] if chat else ch["text"]
            return {"text": text, "latency": time.perf_counter() - t0,
                    "tokens": d["usage"]["completion_tokens"]}
        text, first, n = [], None, 0
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                break
            ev = json.loads(data)
            if "error" in ev:
                return {"error": "error event", "detail": ev["error"]["message"][:200]}
            if first is None:
                first = time.perf_counter() - t0
            if "usage" in ev and not ev["choices"]:
                n = ev["usage"]["completion_tokens"]
                continue
            ch = ev["choices"][0]
            text.append((ch["delta"].get("content") or "") if chat else ch["text"])
        return {"text": "".join(text), "latency": time.perf_counter() - t0, "first": first,
                "tokens": n}
    except (ConnectionResetError, BrokenPipeError) as e:
        return {"error": type(e).__name__}
    except (TimeoutError, socket.timeout):
        return {"error": "timeout"}
    except OSError as e:
        return {"error": type(e).__name__, "detail": str(e)[:200]}


def disconnecting_client(port: int, i: int, max_tokens: int) -> None:
    """A long non-streaming request whose client goes away after 0.5 s."""
    body = json.dumps({"prompt": f"Write a long story about the number {i}.",
                       "max_tokens": max_tokens, "temperature": 0}).encode()
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    time.sleep(0.5)
    s.close()


def slowloris(port: int, stop: threading.Event, log: list) -> None:
    """Half a request, then one header byte every 5 s until stopped or cut off."""
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
    t0 = time.time()
    try:
        while not stop.wait(5):
            s.sendall(b"X")
        log.append(f"held for {time.time() - t0:.0f} s")
    except OSError as e:
        log.append(f"cut off after {time.time() - t0:.0f} s ({type(e).__name__})")
    finally:
        s.close()


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else None


def summary(results: list[dict], wall: float) -> dict:
    ok = [r for r in results if "error" not in r]
    errors: dict[str, int] = {}
    for r in results:
        if "error" in r:
            errors[r["error"]] = errors.get(r["error"], 0) + 1
    lat = [r["latency"] for r in ok]
    first = [r["first"] for r in ok if r.get("first") is not None]
    tokens = sum(r["tokens"] for r in ok)
    return {"requests": len(results), "ok": len(ok), "errors": errors, "wall_s": round(wall, 2),
            "completion_tokens": tokens, "tokens_per_s": round(tokens / wall, 1),
            "latency_p50_s": pct(lat, 0.5), "latency_p99_s": pct(lat, 0.99),
            "first_event_p50_s": pct(first, 0.5), "first_event_p99_s": pct(first, 0.99)}


def health(port: int) -> dict:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    c.request("GET", "/health")
    return json.loads(c.getresponse().read())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.load", description=__doc__.split("\n")[0])
    p.add_argument("--artifacts", default="artifacts/gemma3-270m")
    p.add_argument("--target", default="auto")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--disconnect", type=int, default=10)
    p.add_argument("--slowloris", type=int, default=1)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-concurrent", type=int, default=4)
    p.add_argument("--max-queue", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(args.threads)}
    server = subprocess.Popen(
        [sys.executable, "-m", "runtime.serve", "--artifacts", args.artifacts, "--target",
         args.target, "--port", "0", "--max-concurrent", str(args.max_concurrent),
         "--max-queue", str(args.max_queue)], cwd=ROOT, env=env, stderr=subprocess.PIPE,
        text=True)
    server_log: list[str] = []
    try:
        port = None
        for line in server.stderr:
            server_log.append(line)
            m = re.search(r"on http://127\.0\.0\.1:(\d+)/v1", line)
            if m:
                port = int(m.group(1))
                break
        if port is None:
            print("error: the server did not start:\n" + "".join(server_log[-20:]),
                  file=sys.stderr)
            return 1
        threading.Thread(target=lambda: server_log.extend(server.stderr), daemon=True).start()
        info = health(port)
        long_tokens = max(1, min(1000, info["max_context"] - 48))
        reqs = prompts(args.clients)
        for _, r in reqs:
            r["max_tokens"] = args.max_tokens
            if r["stream"]:
                r["stream_options"] = {"include_usage": True}
        print(f"server: {info['model']} on {info['target']}, port {port}; {args.clients} "
              f"requests of {args.max_tokens} tokens", file=sys.stderr)

        t0 = time.perf_counter()
        seq = []
        for i, (chat, r) in enumerate(reqs):
            seq.append(call(port, chat, r))
            print(f"\rsequential {i + 1}/{len(reqs)}", end="", file=sys.stderr, flush=True)
        seq_wall = time.perf_counter() - t0
        print(file=sys.stderr)

        stop = threading.Event()
        loris_log: list[str] = []
        lorises = [threading.Thread(target=slowloris, args=(port, stop, loris_log))
                   for _ in range(args.slowloris)]
        for t in lorises:
            t.start()
        barrier = threading.Barrier(args.clients + args.disconnect)
        got = [None] * len(reqs)

        def client(i):
            barrier.wait()
            got[i] = call(port, *reqs[i])

        def leaver(i):
            barrier.wait()
            disconnecting_client(port, i, long_tokens)
        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(reqs))]
        threads += [threading.Thread(target=leaver, args=(i,)) for i in range(args.disconnect)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        load_wall = time.perf_counter() - t0
        time.sleep(1)
        after = health(port)
        stop.set()
        for t in lorises:
            t.join()

        differ = sum(1 for a, b in zip(seq, got) if "error" in a or "error" in b
                     or a["text"] != b["text"])
        report = {
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": {"cpu": platform.processor() or platform.machine(),
                        "logical_cpus": os.cpu_count()},
            "settings": {k: getattr(args, k) for k in ("artifacts", "target", "clients",
                                                        "disconnect", "slowloris", "max_tokens",
                                                        "max_concurrent", "max_queue",
                                                        "threads")},
            "server": info,
            "sequential": summary(seq, seq_wall),
            "load": summary(got, load_wall),
            "answers_differing_from_sequential": differ,
            "disconnected_generations_stopped": after.get("cancelled"),
            "slowloris": loris_log,
        }
    finally:
        server.terminate()
        try:
            server.wait(timeout=120)
        except subprocess.TimeoutExpired:
            server.kill()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "load.json").write_text(json.dumps(report, indent=2) + "\n")
    s, ld = report["sequential"], report["load"]
    print(f"{'phase':<11} {'ok':>5} {'errors':<18} {'tok/s':>7} {'p50 s':>7} {'p99 s':>7} "
          f"{'1st p50':>8} {'1st p99':>8}")
    for name, f in (("sequential", s), ("load", ld)):
        print(f"{name:<11} {f['ok']:>5} {json.dumps(f['errors']):<18} {f['tokens_per_s']:>7} "
              f"{f['latency_p50_s']:>7.2f} {f['latency_p99_s']:>7.2f} "
              f"{f['first_event_p50_s'] or 0:>8.2f} {f['first_event_p99_s'] or 0:>8.2f}")
    print(f"answers differing from sequential: {differ} of {len(reqs)}; generations stopped "
          f"because their client left: {report['disconnected_generations_stopped']} of "
          f"{args.disconnect}; slowloris: {'; '.join(loris_log)}")
    print(f"wrote {out / 'load.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
