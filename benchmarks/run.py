"""`python -m benchmarks.run`: our artifacts next to llama.cpp and LiteRT-LM, in one run.

    python -m benchmarks.run [--artifacts DIR ...] [--targets tflite,onnx,xla]
        [--peers llama.cpp,litert-lm,onnxruntime-genai] [--threads 2] [--reps 3]
        [--prefill 128,512] [--short 32] [--long 1024] [--decode 64] [--measure-export]
        [--adapter NAME ...] [--out benchmarks/results]
    python -m benchmarks.run --measure-export --export-only
        [--export-checkpoints ,random:gemma3-1b,random:gemma2-2b,random:gemma3-4b]
        [--export-targets xla,tflite:int8,tflite:int4,onnx:int4]

Every engine runs in its own worker process, once per repetition, interleaved (ours, peers, ours,
...), so each has a clean peak RSS and none warms another's caches; figures are medians over the
repetitions. Measured per engine: load time; prefill tokens/s and time to first token at each
--prefill length (TTFT = prompt in, first logits out); decode tokens/s at short context (--short
prompt tokens, then --decode tokens) and long context (--long prompt tokens, then --decode); peak
RSS; artifact bytes; bytes read per decoded token (weights + the KV cache a step reads) and the
roofline it implies at the machine's read bandwidth measured with the run's thread count; and
for every engine that gives logits (ours, llama.cpp), its quality beside its speed: top-1
agreement, mean KL and perplexity change against the fp32 JAX reference on the same weights,
teacher-forced on the evaluation text (`compile.quality`, --quality-window tokens per window;
--quality-tokens N measures only its first N tokens, for a quick run) and on the held-out text
that nothing is tuned on (--quality-texts). Ratios are to llama.cpp measured in
the same run. Writes `results.json` and `results.png` (if matplotlib is installed) under --out.

Peers are optional: llama.cpp is `llama-cpp-python` on the same GGUF; LiteRT-LM is its own engine
(`litert-lm-api`) on our `.litertlm`; onnxruntime-genai is reported as absent when it does not
import. `pip install -e '.[bench]'` installs them.

`--adapter NAME` (repeatable) measures, for every artifact directory with LoRA slots that has
that run-time adapter, each target with the adapter and without it; give a plain (slot-free)
directory of the same targets too. Besides each case's own worker runs, the adapter's decode
speed against both is measured interleaved in one process per target (`worker_lora_ab`:
separate processes drift by more than the difference asked about) and reported as
`lora_ratios`; with llama.cpp as a peer, its own cost of the same adapter is measured the same
way (the adapter written as a LoRA GGUF, `gguf_lora`). An adapter's quality is measured against
the fp32 reference with it merged.

`--measure-export` exports each checkpoint to each target in its own process and reports wall time
(and per GB of fp32 weights), peak RSS (the export process tree: wait4's ru_maxrss) and disk used,
deleting each artifact after measuring it (under $GEMMA_AOT_EXPORT_TMP if set). `random:VARIANT`
checkpoints are made on the fly, so the largest sizes need no input on disk.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TEXT = ("The history of the printing press begins in the fifteenth century, when movable type "
        "changed how books were made, sold and read across Europe. ")
ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- workers

def _prompt_ids(tokenizer_encode, bos: int, n: int) -> list[int]:
    ids = [bos]
    text = tokenizer_encode(TEXT)
    while len(ids) < n:
        ids += text
    return ids[:n]


def _peak_rss_mb() -> float:
    """This process image's peak RSS (VmHWM). Not getrusage: Linux carries ru_maxrss across
    fork+exec, so a worker would report at least its parent's size."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _measure(spec: dict, load_s: float, ttft, decode) -> dict:
    """The figures every timed engine reports: ttft(n) -> seconds to first logits of an n-token
    prompt, decode(n) -> tokens/s decoding after an n-token prompt."""
    ttft(spec["prefill"][0])   # warm-up: first calls compile or allocate
    out = {"load_s": load_s}
    for n in spec["prefill"]:
        t = ttft(n)
        out[f"ttft_{n}"], out[f"prefill_{n}"] = t, n / t
    out["decode_short"] = decode(spec["short"])
    out["decode_long"] = decode(spec["long"])
    out["peak_rss_mb"] = _peak_rss_mb()
    return out


def _ours_timers(gen, spec: dict, adapter: str | None = None):
    """prefill(n) -> (seconds, logits, state) of an n-token prompt and decode(n) -> tokens/s
    greedy-decoding spec["decode"] tokens after it, on a loaded Generator, with `adapter`'s
    prepared slot inputs (None: the base signatures)."""
    lora = gen._lora(adapter, 1.0) if adapter else None
    kw = {} if lora is None else {"lora": lora}
    b, tok = gen.backend, gen.tokenizer
    longest = max(spec["prefill"] + [spec["long"]])
    ids = _prompt_ids(tok.encode, tok.bos_id, longest + spec["decode"])

    def prefill(n):
        t = time.perf_counter()
        state = gen._fill(ids[:n - 1], b.new_state(), lora=lora)
        logits, state = b.decode(ids[n - 1], n - 1, state, **kw)
        return time.perf_counter() - t, logits, state

    def decode(n):
        _, logits, state = prefill(n)
        t = time.perf_counter()
        for pos in range(n, n + spec["decode"]):
            logits, state = b.decode(int(np.argmax(logits)), pos, state, **kw)
        return spec["decode"] / (time.perf_counter() - t)
    return prefill, decode


def worker_ours(spec: dict) -> dict:
    import runtime
    t0 = time.perf_counter()
    gen = runtime.load(spec["artifacts"], target=spec["target"], num_threads=spec["threads"],
                       adapter=spec.get("adapter"))
    load_s = time.perf_counter() - t0
    prefill, decode = _ours_timers(gen, spec, spec.get("adapter"))
    return _measure(spec, load_s, lambda n: prefill(n)[0], decode)


def worker_lora_ab(spec: dict) -> dict:
    """Decode speed of several cases of one target, interleaved in one process: the slotted
    artifact without an adapter, with each adapter, and a plain artifact (or llama.cpp on its
    GGUF without and with each adapter as a LoRA GGUF). Separate processes measured minutes
    apart differ by up to 30 % on a shared VM, more than the differences asked about; here every
    case runs spec["reps"] times in rotating order, at each length, so drift falls on all alike. Returns {case label: {"decode_short": [...], "decode_long": [...]}}."""
    gens, timers = {}, {}
    for c in spec["cases"]:
        if "gguf" in c:   # llama.cpp: one context per case (the adapter is set at load).
            # llama-cpp-python reads the model without mmap whenever it loads an adapter, so
            # every case here does, or the ratio would also measure the loading mode
            timers[c["label"]] = _llama_timers(_llama({**spec, "gguf": c["gguf"]},
                                                      c.get("lora_path"), use_mmap=False),
                                               spec)[1]
            continue
        import runtime
        if c["artifacts"] not in gens:
            gens[c["artifacts"]] = runtime.load(c["artifacts"], target=spec["target"],
                                                num_threads=spec["threads"])
        timers[c["label"]] = _ours_timers(gens[c["artifacts"]], spec, c.get("adapter"))[1]
    for decode in timers.values():   # warm-up: first calls compile or allocate
        decode(spec["short"])
    out = {label: {"decode_short": [], "decode_long": []} for label in timers}
    labels = list(timers)
    for rep in range(spec["reps"]):
        order = labels[rep % len(labels):] + labels[:rep % len(labels)]
        for key in ("decode_short", "decode_long"):
            for label in order:
                out[label][key].append(timers[label](spec[key.split("_")[1]]))
    return out


def _llama(spec: dict, lora_path: str | None = None, use_mmap: bool = True):
    from llama_cpp import Llama
    return Llama(model_path=spec["gguf"], n_ctx=spec["context"], n_threads=spec["threads"],
                 n_threads_batch=spec["threads"], n_batch=512, verbose=False, use_mmap=use_mmap,
                 **({"lora_path": lora_path, "lora_scale": 1.0} if lora_path else {}))


def _llama_timers(llm, spec: dict):
    """prefill(n) -> seconds to evaluate an n-token prompt, decode(n) -> tokens/s greedy-decoding
    spec["decode"] tokens after it."""
    longest = max(spec["prefill"] + [spec["long"]])
    ids = _prompt_ids(lambda s: llm.tokenize(s.encode(), add_bos=False, special=False),
                      llm.token_bos(), longest + spec["decode"])
    vocab = llm.n_vocab()

    def prefill(n):
        llm.reset()
        t = time.perf_counter()
        llm.eval(ids[:n])
        return time.perf_counter() - t

    def decode(n):
        prefill(n)
        t = time.perf_counter()
        for _ in range(spec["decode"]):   # greedy on the last position's logits
            last = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,))
            llm.eval([int(np.argmax(last))])
        return spec["decode"] / (time.perf_counter() - t)
    return prefill, decode


def worker_llama(spec: dict) -> dict:
    t0 = time.perf_counter()
    llm = _llama(spec)
    load_s = time.perf_counter() - t0
    return _measure(spec, load_s, *_llama_timers(llm, spec))


def worker_litert_lm(spec: dict) -> dict:
    """LiteRT-LM's own benchmark mode: it prefills N tokens and decodes K, timing both."""
    import litert_lm
    out = {}
    with tempfile.TemporaryDirectory() as cache:
        def run(n_prefill, n_decode):
            return litert_lm.Benchmark(spec["bundle"],
                                       backend=litert_lm.Backend.CPU(thread_count=spec["threads"]),
                                       prefill_tokens=n_prefill, decode_tokens=n_decode,
                                       cache_dir=cache).run()
        for n in spec["prefill"]:
            info = run(n, 1)
            out[f"prefill_{n}"] = info.last_prefill_tokens_per_second
            out[f"ttft_{n}"] = info.time_to_first_token_in_second
            out.setdefault("load_s", info.init_time_in_second)
        out["decode_short"] = run(spec["short"], spec["decode"]).last_decode_tokens_per_second
        out["decode_long"] = run(spec["long"], spec["decode"]).last_decode_tokens_per_second
    out["peak_rss_mb"] = _peak_rss_mb()
    return out


WORKERS = {"ours": worker_ours, "lora-ab": worker_lora_ab, "llama.cpp": worker_llama,
           "litert-lm": worker_litert_lm}


def run_worker(spec: dict) -> dict:
    r = subprocess.run([sys.executable, "-m", "benchmarks.run", "--worker", json.dumps(spec)],
                       cwd=ROOT, capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        return {"error": (r.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(r.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- machine facts

def read_bandwidth_gbs(threads: int = 1, gib: float = 1.0) -> float:
    """Streaming read bandwidth with `threads` threads (numpy sums over disjoint slices of one
    float32 array; numpy releases the GIL in them), best of 3: the roofline of a run must use its
    own thread count (one thread's bandwidth is exceeded by two-thread decode)."""
    from concurrent.futures import ThreadPoolExecutor
    a = np.ones(int(gib * (1 << 30)) // 4, np.float32)
    parts = np.array_split(a, threads)
    best = 0.0
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(3):
            t = time.perf_counter()
            list(pool.map(np.sum, parts))
            best = max(best, a.nbytes / (time.perf_counter() - t) / 1e9)
    return best


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ----------------------------------------------------------------------------- engines

def engines(args) -> list[dict]:
    import runtime
    from runtime import adapters
    from runtime.backends import reasons
    out = []
    wanted = [t for t in (args.targets or "").split(",") if t]
    for d in args.artifacts:
        m = runtime.Manifest.read(d)
        why = reasons(m)
        cfg, context = m.config, m.max_context
        kv_bytes = m.contract.kv.nbytes()
        for target, rec in m.artifacts.items():
            if (wanted and target not in wanted) or why.get(target):
                continue
            size = sum(f["bytes"] for f in rec["files"].values()
                       if not f["path"].endswith(".litertlm"))
            step = size - unread_bytes(cfg, target, rec.get("quantization")) + kv_bytes
            what = rec.get("quantization") + (", float activations"
                                              if rec.get("activations") == "float" else "")
            recipe = (rec.get("recipe") or {}).get("name")
            if recipe and recipe != "plain":   # compile.recipes: rotated/smoothed before int8
                what += f", {recipe}"
            lora = m.data["signatures"].get("lora")
            if lora:
                what += f", LoRA slots r{lora['rank']}"
            for adapter in [None] + ([a for a in args.adapter if a in m.data.get("adapters", {})]
                                     if lora else []):
                out.append({"kind": "ours", "name": f"gemma-aot {target} ({what})"
                            + (f" + adapter {adapter}" if adapter else ""),
                            "artifacts": str(m.root), "target": target, "artifact_bytes": size,
                            "bytes_per_token": {"short": step, "long": step},
                            "context": context, "adapter": adapter, "slots": bool(lora),
                            "quantization": what, "base_id": adapters.base_id(m.data)})
            if target == "tflite" and "litert-lm" in args.peers:
                bundle = m.path(rec["files"]["litertlm"]["path"])
                out.append({"kind": "litert-lm", "name": f"LiteRT-LM engine ({what})",
                            "bundle": str(bundle), "artifacts": str(m.root),
                            "artifact_bytes": bundle.stat().st_size,
                            "bytes_per_token": {"short": step, "long": step},
                            "context": context})
        cfg_layers = cfg["num_layers"]
        kv_row = 2 * cfg_layers * cfg["num_kv_heads"] * cfg["head_dim"] * 2   # f16 K and V
        if "llama.cpp" in args.peers and not any(e["kind"] == "llama.cpp" for e in out):
            gguf = args.gguf or _default_gguf()
            size = Path(gguf).stat().st_size
            out.append({"kind": "llama.cpp", "name": "llama.cpp (GGUF Q4_K_M)", "gguf": str(gguf),
                        "artifact_bytes": size, "context": context,
                        # llama.cpp reads only the filled part of its f16 cache
                        "bytes_per_token": {"short": size + kv_row * (args.short + args.decode),
                                            "long": size + kv_row * (args.long + args.decode)}})
    # names key the runs and the quality figures: two artifact directories with the same target
    # and quantization are told apart by their directory
    names = [e["name"] for e in out]
    for e in out:
        if names.count(e["name"]) > 1 and "artifacts" in e:
            e["name"] += f" [{e['artifacts']}]"
    return out


# bytes an artifact stores per weight, by quantization and matmul kind: MatMulNBits blocks of 32
# with a float32 scale (asymmetric ones a float32 bias too)
_PER_WEIGHT = {"none": {}, "int8": {"*": 1 + 4 / 32}, "int4": {"*": 0.5 + 4 / 32},
               "mixed": {"*": 0.5 + 8 / 32, "down": 1 + 4 / 32}}


def unread_bytes(cfg: dict, target: str, quant: str | None) -> int:
    """Bytes of an artifact that a decode step does not read. Quantized tflite/onnx keep an int8
    lookup copy of the embedding (a step reads one row); Gemma 4 adds its per-layer embedding
    table (one row per step; int8 blocks when quantized) and the experts no token chose (a step
    reads top_k of num_experts per layer). Every other weight and the whole fixed-length cache
    are read every step."""
    quantized = target in ("tflite", "onnx") and quant not in (None, "none")
    out = cfg["vocab_size"] * cfg["d_model"] if quantized else 0
    if cfg.get("ple_dim"):
        table = cfg["ple_vocab_size"] * cfg["num_layers"] * cfg["ple_dim"]
        out += int(table * ((1 + 4 / 32) if quantized else 4))
    if cfg.get("num_experts"):
        E, k = cfg["num_experts"], cfg["top_k_experts"]
        # tflite's int8 experts (LiteRT's MoE op) have one scale per row, not per 32 inputs
        per = {"*": 1.0} if (target, quant) == ("tflite", "int8") else \
            _PER_WEIGHT.get(quant or "none", {})
        one = cfg["d_model"] * cfg["moe_ffn_dim"]
        expert = one * (2 * per.get("*", 4) + per.get("down", per.get("*", 4)))
        out += int(cfg["num_layers"] * (E - k) * expert)
    return out


def _default_gguf() -> str:
    from compile.checkpoints import default_checkpoint
    return str(default_checkpoint())


def peer_status(peers: list[str]) -> dict[str, str]:
    import importlib
    status = {}
    for peer, module in (("llama.cpp", "llama_cpp"), ("litert-lm", "litert_lm"),
                         ("onnxruntime-genai", "onnxruntime_genai")):
        if peer not in peers:
            status[peer] = "not requested"
            continue
        try:
            mod = importlib.import_module(module)
            status[peer] = f"{module} {getattr(mod, '__version__', '')}".strip()
        except ImportError:
            status[peer] = f"not installed (pip install {'llama-cpp-python' if peer == 'llama.cpp' else peer})"
    if status.get("onnxruntime-genai", "").startswith("onnxruntime_genai"):
        status["onnxruntime-genai"] += " (installed; its model builder has no Gemma 3 GGUF path: not run)"
    return status


# ----------------------------------------------------------------------------- quality

def _reference(source: dict):
    """The checkpoint an artifact directory was exported from (its manifest's source), or None."""
    from compile import checkpoints
    from compile.export import random_checkpoint
    if source.get("format") == "random":
        return random_checkpoint(source["variant"], source.get("seed", 0))
    if source.get("path") and Path(source["path"]).exists():
        return checkpoints.load(source["path"])
    return None


def _with_adapter(ck, manifest, name: str):
    """The checkpoint with a run-time adapter of the artifact merged, from its slot tensors
    (A [in, R], B [R, out] with the scaling in B)."""
    import dataclasses
    from compile import lora
    from runtime import adapters
    tensors = adapters.read(manifest, name).tensors
    modules = {}
    for s in manifest.contract.lora_slots():
        if s.a_name in tensors:
            w = f"layers.{s.layer}.{s.target}"
            modules[w] = lora.Module(w, w, tensors[s.a_name].T, tensors[s.b_name].T, 1.0)
    return dataclasses.replace(ck, params=lora.merge(ck.params, lora.Adapter(
        Path(name), modules, ())))


def _plain_of(e: dict, todo: list[dict]) -> dict | None:
    """The plain (slot-free) engine of the same weights (`runtime.adapters.base_id`), target and
    quantization as a slotted one."""
    what = e["quantization"].split(", LoRA slots")[0]
    return next((b for b in todo if b["kind"] == "ours" and not b.get("slots") and
                 b["target"] == e["target"] and b["quantization"] == what and
                 b["base_id"] == e["base_id"]), None)


def measure_lora_interleaved(todo: list[dict], common: dict, reps: int) -> list[dict]:
    """For every slotted (artifact directory, target) measured with an adapter: one worker
    process decoding without an adapter, with each adapter and on the plain artifact of the
    same target and quantization (if given), interleaved (`worker_lora_ab`). With llama.cpp as a
    peer, the same for it: its GGUF without and with each adapter (`gguf_lora`) whose artifact
    was exported from that GGUF."""
    out = []
    for e in todo:
        if e["kind"] != "ours" or not e.get("slots") or e.get("adapter"):
            continue
        with_ = [a for a in todo if a["kind"] == "ours" and a.get("adapter") and
                 a["artifacts"] == e["artifacts"] and a["target"] == e["target"]]
        if not with_:
            continue
        cases = [{"label": "slotted", "artifacts": e["artifacts"]}]
        cases += [{"label": a["adapter"], "artifacts": e["artifacts"], "adapter": a["adapter"]}
                  for a in with_]
        plain = _plain_of(e, todo)
        if plain:
            cases.append({"label": "plain", "artifacts": plain["artifacts"]})
        print(f"LoRA, interleaved in one process ({reps} reps): {e['name']}: "
              + ", ".join(c["label"] for c in cases), file=sys.stderr)
        r = run_worker({"kind": "lora-ab", **common, "target": e["target"], "reps": reps,
                        "cases": cases})
        out.append({"engine": e["name"], "artifacts": e["artifacts"], "target": e["target"],
                    "plain": plain["artifacts"] if plain else None,
                    "names": {a["adapter"]: a["name"] for a in with_}, **_medians(r)})
    with tempfile.TemporaryDirectory() as tmp:
        peer = _llama_lora_cases(todo, Path(tmp))
        if peer:
            llama, cases = peer
            print(f"LoRA, interleaved in one process ({reps} reps): llama.cpp: "
                  + ", ".join(c["label"] for c in cases), file=sys.stderr)
            r = run_worker({"kind": "lora-ab", **common, "target": "llama.cpp", "reps": reps,
                            "context": llama["context"], "cases": cases})
            out.append({"engine": llama["name"], "gguf": llama["gguf"], **_medians(r)})
    return out


def _medians(r: dict) -> dict:
    if "error" in r:
        return {"error": r["error"]}
    return {"runs": r, "median": {label: {k: statistics.median(v) for k, v in d.items()}
                                  for label, d in r.items()}}


def gguf_lora(manifest, name: str, path: Path) -> Path:
    """A run-time adapter of an artifact as a llama.cpp LoRA GGUF for the same base GGUF: per
    matmul `<tensor>.lora_a` [R, in] and `.lora_b` [out, R] (ggml's ne reversed: A's ne[0] is the
    matmul's input width) with the scaling already in B, so no adapter.lora.alpha (llama.cpp then
    scales by the request's scale alone)."""
    import gguf
    from compile.checkpoints.gguf import ARCHS, matmul_name
    from runtime import adapters
    tensors = adapters.read(manifest, name).tensors
    arch = {family: a for a, family in ARCHS.items()}[manifest.config["family"]]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    for slot in manifest.contract.lora_slots():
        if slot.a_name in tensors:
            t = matmul_name(slot.layer, slot.target)
            w.add_tensor(t + ".lora_a", np.ascontiguousarray(tensors[slot.a_name].T, np.float32))
            w.add_tensor(t + ".lora_b", np.ascontiguousarray(tensors[slot.b_name].T, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _exported_from(source: dict, gguf: str) -> bool:
    """Whether an artifact directory's manifest source is that very GGUF (llama.cpp's file)."""
    return source.get("format") == "gguf" and \
        Path(source["path"]).resolve() == Path(gguf).resolve()


def _llama_lora_cases(todo: list[dict], tmp: Path) -> tuple[dict, list[dict]] | None:
    """llama.cpp's engine and its cases (no adapter, each adapter as a LoRA GGUF) for the
    adapters of slotted artifact directories exported from the very GGUF it reads."""
    import runtime
    llama = next((e for e in todo if e["kind"] == "llama.cpp"), None)
    if llama is None:
        return None
    cases, seen = [{"label": "base", "gguf": llama["gguf"]}], set()
    for a in todo:
        if a["kind"] != "ours" or not a.get("adapter") or a["adapter"] in seen:
            continue
        m = runtime.Manifest.read(a["artifacts"])
        if not _exported_from(m.data["model"].get("source", {}), llama["gguf"]):
            continue
        seen.add(a["adapter"])
        path = gguf_lora(m, a["adapter"], tmp / f"{a['adapter']}.gguf")
        cases.append({"label": a["adapter"], "gguf": llama["gguf"],
                      "lora_path": str(path)})
    return (llama, cases) if seen else None


def lora_ratios(interleaved: list[dict], quality: dict | None = None) -> list[str]:
    """Decode speed with each adapter against the same artifact without one and against a plain
    (slot-free) artifact of the same target and quantization (llama.cpp: against its GGUF without
    the adapter), from the interleaved runs, each with its quality where measured."""
    lines = []
    for g in interleaved:
        if "error" in g:
            lines.append(f"{g['engine']}: failed: {g['error']}")
            continue
        m = g["median"]
        bases = (("without", "base"),) if "gguf" in g else \
            (("slotted without", "slotted"), ("plain base", "plain"))
        for label in m:
            if label in ("base", "slotted", "plain"):
                continue
            name = g.get("names", {}).get(label, f"{g['engine']} + adapter {label}")
            parts = [f"{key} {m[label][key]:.1f} tok/s = {m[label][key] / m[base][key]:.2f}x "
                     f"{what}" for key in ("decode_short", "decode_long")
                     for what, base in bases if base in m]
            q = (quality or {}).get(name) or {}
            if "top1" in q:
                parts.append(f"top-1 {q['top1']:.3f}, KL {q['mean_kl']:.4f} against fp32 with "
                             f"the adapter merged")
            lines.append(f"{name}: " + ", ".join(parts))
    return lines


def measure_quality(todo: list[dict], args) -> dict[str, dict]:
    """Teacher-forced top-1, KL and perplexity delta of every engine against the fp32 JAX
    reference on each of --quality-texts (`compile.quality.TEXTS`; the first text's figures at the
    top of an engine's dict, each further one under its name): per artifact directory, the reference is
    the checkpoint it was exported from (its manifest's source), run once per window for all its
    engines; llama.cpp is measured against the same reference when it reads that very GGUF."""
    from compile import quality
    from runtime import contract as ct
    import runtime
    out: dict[str, dict] = {}
    llama = next((e for e in todo if e["kind"] == "llama.cpp"), None)
    for e in todo:
        if e["kind"] not in ("ours", "llama.cpp"):
            out[e["name"]] = {"skipped": "its Python API returns text, not logits"}
    groups: dict[tuple, list[dict]] = {}
    for e in todo:
        if e["kind"] == "ours":
            groups.setdefault((e["artifacts"], e.get("adapter")), []).append(e)
    # llama.cpp's LoRA GGUFs (read when it loads); removed at the end, or at exit on an error
    tmp_dir = tempfile.TemporaryDirectory()
    tmp = tmp_dir.name
    for (root, adapter), engines_ in groups.items():
        m = runtime.Manifest.read(root)
        source = m.data["model"].get("source", {})
        ck = _reference(source)
        if ck is None:
            for e in engines_:
                out[e["name"]] = {"skipped": f"its checkpoint {source} is not readable here"}
            continue
        if adapter:   # the reference: the fp32 model with the adapter merged
            ck = _with_adapter(ck, m, adapter)
        encode, piece_id = quality.tokenizer_fns(ck.tokenizer_model)
        window = min(args.quality_window, m.max_context)
        texts = {name: quality.windows(quality.eval_ids(encode, piece_id, name),
                                       ck.special_ids["bos"], window,
                                       limit=args.quality_tokens or None)
                 for name in args.quality_texts}
        contract = ct.Contract(ck.config, tuple(m.prefill_lengths), m.max_context)
        candidates = {}
        for e in engines_:
            gen = runtime.load(root, target=e["target"], num_threads=args.threads,
                               adapter=adapter)
            candidates[e["name"]] = lambda w, gen=gen: gen.iter_logits(w, 0)
        if llama and _exported_from(source, llama["gguf"]) and \
                (adapter or llama["name"] not in out):
            name, lora = llama["name"], None
            if adapter:   # llama.cpp applies the same adapter as a LoRA GGUF
                name += f" + adapter {adapter}"
                lora = str(gguf_lora(m, adapter, Path(tmp) / f"{adapter}.gguf"))
            candidates[name] = quality.llama_cpp_rows(llama["gguf"], window, args.threads, lora)
        for text, wins in texts.items():
            print(f"quality: {sum(len(w) for w in wins)} tokens of the {text} text in {len(wins)} "
                  f"windows of <= {window} against {root}'s checkpoint: {', '.join(candidates)}",
                  file=sys.stderr)
            figures = quality.evaluate_many(contract, ck.params, wins, candidates, text=text)
            for name, f in figures.items():   # the first text's figures at the top, others by name
                if name in out:
                    out[name][text] = f
                else:
                    out[name] = {**f, "text": text}
        del candidates
    tmp_dir.cleanup()
    if llama and llama["name"] not in out:
        out[llama["name"]] = {"skipped": "no artifact directory was exported from its GGUF"}
    return out


# ----------------------------------------------------------------------------- export

DEFAULT_EXPORTS = "xla,tflite:int8,tflite:int4,onnx:int4"


def measure_export(checkpoints: list[str | None], targets: list[tuple[str, str | None]],
                   ) -> list[dict]:
    """Wall time, peak RSS and disk used of each export (checkpoint x target), each in its own
    process; the artifact is deleted after it is measured. A checkpoint is anything
    `compile.export --checkpoint` takes (None: the embedded default; `random:VARIANT` makes a
    full-size model on the fly, with no input on disk)."""
    from compile import export as ex
    from compile.weights import nbytes_of
    out = []
    for spec in checkpoints:
        try:
            ck = ex.load_checkpoint(spec)
            name, weights_gb = ck.config.name, nbytes_of(ck.params) / 1e9
            del ck
        except Exception as e:   # reported like a failed export
            name, weights_gb = spec or "default", None
            print(f"export {spec}: cannot read the checkpoint ({e})", file=sys.stderr)
        for target, quant in targets:
            with tempfile.TemporaryDirectory(dir=os.environ.get("GEMMA_AOT_EXPORT_TMP")) as d:
                cmd = [sys.executable, "-m", "compile.export", "--target", target,
                       "--out", f"{d}/a"] + (["--checkpoint", spec] if spec else [])
                if quant:
                    cmd += ["--quant", quant]
                t = time.perf_counter()
                p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
                err = p.stderr.read().decode(errors="replace") if p.stderr else ""
                _, status, usage = os.wait4(p.pid, 0)
                wall = time.perf_counter() - t
                ok = os.waitstatus_to_exitcode(status) == 0
                disk = sum(f.stat().st_size for f in Path(d).rglob("*") if f.is_file())
            row = {"checkpoint": spec or "default", "variant": name, "target": target,
                   "quant": quant or "default", "wall_s": round(wall, 1),
                   "peak_rss_mb": round(usage.ru_maxrss / 1024), "disk_mb": round(disk / 1e6),
                   "fp32_weights_gb": round(weights_gb, 3) if weights_gb else None,
                   "s_per_fp32_gb": round(wall / weights_gb, 1) if weights_gb else None, "ok": ok}
            if not ok:
                lines = err.strip().splitlines()
                said = [ln for ln in lines if ln.startswith("error:")]   # the CLI's own message
                row["error"] = (said or lines or ["(no message)"])[-1]
            out.append(row)
            print(f"export {name} {target} {quant or ''}: {wall:.0f} s, {row['peak_rss_mb']} MB "
                  f"peak RSS, {row['disk_mb']} MB on disk" + ("" if ok else f" FAILED: "
                                                             f"{row['error']}"), file=sys.stderr)
    return out


def export_table(rows: list[dict]) -> str:
    lines = [f"{'variant':<16}{'target':<14}{'time s':>8}{'s/GB':>7}{'peak RSS MB':>13}"
             f"{'disk MB':>9}  result"]
    for r in rows:
        lines.append(f"{r['variant']:<16}{r['target'] + ' ' + r['quant']:<14}{r['wall_s']:>8.0f}"
                     f"{r['s_per_fp32_gb'] or 0:>7.0f}{r['peak_rss_mb']:>13}{r['disk_mb']:>9}  "
                     + ("ok" if r["ok"] else r["error"]))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- report

FIELDS = ("prefill", "ttft", "decode_short", "decode_long", "peak_rss_mb", "load_s")


def summarize(runs: list[dict]) -> dict:
    ok = [r for r in runs if "error" not in r]
    if not runs:
        return {"error": "not timed (--reps 0)"}
    if not ok:
        return {"error": runs[-1].get("error", "failed")}
    return {k: statistics.median(r[k] for r in ok) for k in ok[0]}


def table(results: list[dict], args, bandwidth: float) -> str:
    base = next((r for r in results if r["kind"] == "llama.cpp" and "error" not in r["median"]), None)
    n_big = max(args.prefill)
    w = max([36] + [len(r["name"]) + 2 for r in results])   # the engine column fits every name
    head = (f"{'engine':<{w}}{'prefill ' + str(n_big):>12}{'TTFT ' + str(min(args.prefill)):>10}"
            f"{'decode ≤' + str(args.short + args.decode):>12}{' decode @' + str(args.long):>12}"
            f"{'roofline':>10}{'RSS MB':>8}{'size MB':>9}{'top-1':>7}{'KL':>8}{'ppl Δ':>8}"
            + "".join(f"{t[:7] + ' top-1':>14}{'KL':>8}" for t in args.quality_texts[1:])
            + "   vs llama.cpp (prefill/decode)")
    lines = [head, "-" * len(head)]
    for r in results:
        m = r["median"]
        if "error" in m:
            if r.get("quality") and not r["runs"]:   # --reps 0: quality only
                lines.append(f"{r['name']:<{w}}{'(not timed)':>46}{'':>18}"
                             f"{r['artifact_bytes'] / 1e6:>9.0f}{_quality(r['quality'])}"
                             + "".join(_quality_short(r["quality"].get(t))
                                       for t in args.quality_texts[1:]))
                continue
            lines.append(f"{r['name']:<{w}}failed: {m['error']}")
            continue
        roof = bandwidth * 1e9 / r["bytes_per_token"]["short"]
        ratio = ""
        if base:
            b = base["median"]
            ratio = (f"{m[f'prefill_{n_big}'] / b[f'prefill_{n_big}']:.2f}x / "
                     f"{m['decode_short'] / b['decode_short']:.2f}x")
        lines.append(f"{r['name']:<{w}}{m[f'prefill_{n_big}']:>12.1f}{m[f'ttft_{min(args.prefill)}']:>9.3f}s"
                     f"{m['decode_short']:>12.1f}{m['decode_long']:>12.1f}{roof:>10.1f}"
                     f"{m['peak_rss_mb']:>8.0f}{r['artifact_bytes'] / 1e6:>9.0f}"
                     f"{_quality(r.get('quality'))}"
                     + "".join(_quality_short((r.get("quality") or {}).get(t))
                               for t in args.quality_texts[1:])
                     + f"   {ratio}")
    return "\n".join(lines)


def _quality(q) -> str:
    """top-1, mean KL and relative perplexity change against the fp32 reference."""
    if not q or "top1" not in q:
        return f"{'-':>7}{'-':>8}{'-':>8}"
    return f"{q['top1']:>7.3f}{q['mean_kl']:>8.4f}{q['ppl_delta_rel']:>+8.2%}"


def _quality_short(q) -> str:
    """top-1 and mean KL on a further text."""
    if not q or "top1" not in q:
        return f"{'-':>14}{'-':>8}"
    return f"{q['top1']:>14.3f}{q['mean_kl']:>8.4f}"


def chart(results: list[dict], args, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ok = [r for r in results if "error" not in r["median"]]
    names = [r["name"] for r in ok]
    n_big = max(args.prefill)
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.5 * len(ok) + 2))
    for ax, key, title in ((axes[0], f"prefill_{n_big}", f"prefill {n_big} tokens (tok/s)"),
                           (axes[1], "decode_short", "decode, short context (tok/s)")):
        ax.barh(names, [r["median"][key] for r in ok],
                color=["#888" if r["kind"] != "ours" else "#1a73e8" for r in ok])
        ax.set_title(title)
        ax.invert_yaxis()
    axes[1].set_yticklabels([])
    fig.suptitle(f"Gemma 3 270M, {args.threads} threads, {cpu_name()}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--artifacts", action="append", default=None,
                   help="artifact directory, repeatable (default: artifacts/gemma3-270m)")
    p.add_argument("--targets", default="", help="comma-separated (default: every runnable one)")
    p.add_argument("--peers", default="llama.cpp,litert-lm,onnxruntime-genai")
    p.add_argument("--gguf", default=None, help="llama.cpp's model (default: the embedded GGUF)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=3,
                   help="timed repetitions per engine (0: quality only)")
    p.add_argument("--prefill", default="128,512")
    p.add_argument("--short", type=int, default=32, help="prompt tokens before short-context decode")
    p.add_argument("--long", type=int, default=1024, help="prompt tokens before long-context decode")
    p.add_argument("--decode", type=int, default=64, help="tokens decoded per decode measurement")
    p.add_argument("--measure-export", action="store_true",
                   help="also measure exports: time, peak RSS and disk per checkpoint and target")
    p.add_argument("--export-checkpoints", default="",
                   help="comma-separated --checkpoint values for --measure-export (default: the "
                        "embedded model), e.g. ,random:gemma3-1b,random:gemma2-2b")
    p.add_argument("--export-targets", default=DEFAULT_EXPORTS,
                   help=f"target[:quant],... for --measure-export (default {DEFAULT_EXPORTS})")
    p.add_argument("--export-only", action="store_true",
                   help="with --measure-export: skip the speed runs")
    p.add_argument("--quality-window", type=int, default=1024,
                   help="quality of every engine against the fp32 reference, teacher-forced on "
                        "the evaluation text in windows of this many tokens (0: skip)")
    p.add_argument("--quality-tokens", type=int, default=0,
                   help="measure quality on the first N tokens of each text only "
                        "(default: all of it, ~2,300 tokens each; the export's gate uses 512)")
    p.add_argument("--quality-texts", default="eval,heldout",
                   help="the texts of compile.quality.TEXTS quality is measured on: 'eval' (what "
                        "recipes and gates are tuned on) and 'heldout' (never tuned on); the "
                        "first one's figures fill the table, the others follow it")
    p.add_argument("--adapter", action="append", default=[],
                   help="a run-time LoRA adapter of an artifact with slots, repeatable: its "
                        "targets are measured with it and without (and against a plain "
                        "artifact given with --artifacts)")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    args.quality_texts = [t.strip() for t in args.quality_texts.split(",") if t.strip()]
    from compile.quality import TEXTS
    unknown = [t for t in args.quality_texts if t not in TEXTS]
    if unknown or not args.quality_texts:
        p.error(f"--quality-texts: unknown {', '.join(unknown) or '(none given)'}; "
                f"known: {', '.join(TEXTS)}")
    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(WORKERS[spec["kind"]](spec)))
        return 0

    if args.export_only:
        if not args.measure_export:
            raise SystemExit("--export-only goes with --measure-export")
        return _exports_only(args)
    args.artifacts = args.artifacts or ["artifacts/gemma3-270m"]
    args.prefill = sorted(int(x) for x in args.prefill.split(","))
    args.peers = [x.strip() for x in args.peers.split(",") if x.strip()]
    peers = peer_status(args.peers)
    args.peers = [k for k, v in peers.items()
                  if v.startswith(("llama_cpp", "litert_lm"))]
    todo = engines(args)
    common = {"threads": args.threads, "prefill": args.prefill, "short": args.short,
              "long": args.long, "decode": args.decode}
    for e in todo:
        if args.long + args.decode > e["context"]:
            raise SystemExit(f"--long {args.long} + --decode {args.decode} exceeds the max context "
                             f"{e['context']} of {e['name']}")
    print(f"{cpu_name()}, {os.cpu_count()} logical CPUs; {args.threads} threads; "
          f"{args.reps} reps; peers: " + "; ".join(f"{k}: {v}" for k, v in peers.items()),
          file=sys.stderr)
    bandwidth = read_bandwidth_gbs(args.threads)
    print(f"read bandwidth with {args.threads} threads: {bandwidth:.1f} GB/s", file=sys.stderr)
    runs = {e["name"]: [] for e in todo}
    for rep in range(args.reps):
        for e in todo:
            r = run_worker({**e, **common})
            runs[e["name"]].append(r)
            print(f"rep {rep + 1}/{args.reps} {e['name']}: "
                  + (r["error"] if "error" in r else
                     f"prefill {r[f'prefill_{max(args.prefill)}']:.0f} tok/s, "
                     f"decode {r['decode_short']:.1f} / {r['decode_long']:.1f} tok/s"),
                  file=sys.stderr)
    results = [{**e, "runs": runs[e["name"]], "median": summarize(runs[e["name"]])} for e in todo]
    qual = {}
    if args.quality_window:
        qual = measure_quality(todo, args)
        for r in results:
            r["quality"] = qual.get(r["name"])
    report = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_name(), "logical_cpus": os.cpu_count(),
                    "platform": platform.platform(), "read_bandwidth_gbs": round(bandwidth, 2),
                    "read_bandwidth_threads": args.threads},
        "settings": {**common, "reps": args.reps, "quality_window": args.quality_window,
                     "quality_tokens": args.quality_tokens or None,
                     "quality_texts": args.quality_texts},
        "peers": peers, "results": results,
    }
    if args.measure_export:
        report["exports"] = measure_export(*_export_plan(args))
        print(export_table(report["exports"]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=1) + "\n")
    text = table(results, args, bandwidth)
    if any(e.get("adapter") for e in todo):
        report["lora_interleaved"] = measure_lora_interleaved(todo, common, args.reps)
        report["lora_quality"] = {k: v for k, v in qual.items()
                                  if k not in {e["name"] for e in todo}}   # llama.cpp + adapter
        report["lora_ratios"] = lora_ratios(report["lora_interleaved"], qual)
    if report.get("lora_ratios"):
        text += "\n\nLoRA adapters, decode speed:\n" + "\n".join(report["lora_ratios"])
        (out / "results.json").write_text(json.dumps(report, indent=1) + "\n")
    print(text)
    drew = chart(results, args, out / "results.png")
    print(f"wrote {out / 'results.json'}" + (f" and {out / 'results.png'}" if drew else
                                             " (no chart: pip install matplotlib)"))
    return 0


def _export_plan(args):
    checkpoints = [c.strip() or None for c in args.export_checkpoints.split(",")] \
        if args.export_checkpoints else [None]
    targets = [(t.split(":")[0], t.split(":")[1] if ":" in t else None)
               for t in args.export_targets.split(",") if t.strip()]
    return checkpoints, targets


def _exports_only(args) -> int:
    rows = measure_export(*_export_plan(args))
    report = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "machine": {"cpu": cpu_name(), "logical_cpus": os.cpu_count(),
                          "memory_gb": round(os.sysconf("SC_PAGE_SIZE") *
                                             os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
                          "platform": platform.platform()},
              "exports": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "exports.json").write_text(json.dumps(report, indent=1) + "\n")
    print(export_table(rows))
    print(f"wrote {out / 'exports.json'}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
