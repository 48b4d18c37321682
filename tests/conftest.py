import contextlib
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _share_jax_compilations() -> None:
    """One persistent JAX compilation cache for the session's processes (both pytest-xdist
    workers and every CLI they start), in this source tree's generation of the artifact cache:
    the same program (a tiny variant's reference forward, a signature the runtime loads) is
    compiled once, not once per test, process and worker (12% of the suite's CPU time). XLA
    keys each entry by the program, the compile options and the versions, so a hit is the
    executable a compile would have given. Set before JAX is imported; the runtime uses a
    configured cache instead of the artifact's own `xla/jax_cache/` (test_info_cache.py checks
    that default in a process without it)."""
    from artifacts import generation
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(generation() / "jax-cache"))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


_share_jax_compilations()

TINY_LENGTHS = (4, 8)
TINY_CONTEXT = 64


# The files that run longest (seconds on the 2-core VM), started first: with pytest-xdist's
# loadfile distribution a long file started last would run alone on one core at the end.
# Ordered also so that the two workers do not start by waiting for the same real-model export.
LONGEST_FIRST = ("test_real_targets.py", "test_lora_runtime.py", "test_lora_real.py",
                 "test_kv_cache.py", "test_xla_tpu.py", "test_loaders.py", "test_tflite.py",
                 "test_gemma4.py", "test_real_model.py", "test_errors.py", "test_lora.py",
                 "test_info_cache.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))   # stable within a file


def pytest_configure(config):
    config.addinivalue_line("markers", "real: runs the real Gemma 3 270M model (slow)")
    config.addinivalue_line("markers", "index: installs packages into a fresh venv: from the "
                            "wheelhouse `make venv` downloads (.venv/wheels), else the index")


@pytest.fixture(scope="session")
def tiny_export():
    """(variant, targets, **options) -> the artifact of that tiny random checkpoint with lengths
    4, 8 and context 64, exported once for the whole suite. Read it; copy it to change it."""
    from artifacts import exported

    def get(variant: str, targets=("xla",), lengths=TINY_LENGTHS, context=TINY_CONTEXT,
            **options) -> Path:
        return exported(f"random:{variant}", list(targets), lengths, context, options)
    return get


@pytest.fixture(scope="session")
def tiny_artifacts(tiny_export):
    """variant -> the xla artifact of its tiny random checkpoint (`tiny_export`'s defaults)."""
    return lambda variant: tiny_export(variant)


@pytest.fixture(scope="session")
def real_gguf() -> Path:
    from compile.checkpoints import default_checkpoint
    return default_checkpoint()


@contextlib.contextmanager
def _gguf_read_in_memory():
    """gguf's GGUFReader (which transformers reads a GGUF with, three times) parses the file
    from a numpy memmap, and each of the 262,144 vocabulary strings costs dozens of memmap
    slices (~15 s a read, 45 of transformers' ~50 s). Here it parses the same bytes from an
    in-memory array instead: the same parsing code and values (state dict and config compared
    equal when this was written), ~2x faster. transformers only reads a reader's fields and
    tensors, so its three reads of one file share one parse. Only while transformers reads the
    oracle's files."""
    import gguf
    import gguf.gguf_reader as reader
    import numpy

    class _InMemory:
        def __getattr__(self, name):
            return getattr(numpy, name)

        @staticmethod
        def memmap(path, mode="r", **kw):
            return numpy.fromfile(path, dtype=numpy.uint8)

    parsed = {}

    def shared(path, *args, **kw):
        key = (str(path), args, tuple(sorted(kw.items())))
        if key not in parsed:
            parsed[key] = cls(path, *args, **kw)
        return parsed[key]

    cls = gguf.GGUFReader
    saved, reader.np, gguf.GGUFReader = reader.np, _InMemory(), shared
    try:
        yield
    finally:
        reader.np, gguf.GGUFReader = saved, cls


@pytest.fixture(scope="session")
def transformers_gguf(real_gguf):
    """() -> (tokenizer, model in eval mode): the oracle, transformers' own reading of the real
    GGUF (its dequantization, its tokenizer conversion), a fresh fp32 model at each call (PEFT
    wraps the one it is given). transformers reads the GGUF once for the suite (~25 s); what it
    read (its state dict, its config without the GGUF origin, its tokenizer's own files) is kept
    in the artifact cache and read back from there (~4 s)."""
    from artifacts import cached
    import transformers

    def make(out: Path):
        import json
        import torch
        from safetensors.torch import save_model
        from transformers import AutoModelForCausalLM, AutoTokenizer
        d, name = str(real_gguf.parent), real_gguf.name
        out.mkdir(parents=True)
        with _gguf_read_in_memory():
            AutoTokenizer.from_pretrained(d, gguf_file=name).save_pretrained(out)
            model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
        save_model(model, str(out / "model.safetensors"))   # save_pretrained refuses a GGUF's
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        (out / "config.json").write_text(json.dumps(config))
        model.generation_config.save_pretrained(out)
    saved = cached("transformers-gguf", {"gguf": str(real_gguf), "bytes": real_gguf.stat().st_size,
                                         "transformers": transformers.__version__}, make)

    def get():
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        return (AutoTokenizer.from_pretrained(saved),
                AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32).eval())
    return get


@pytest.fixture(scope="session")
def real_checkpoint(real_gguf):
    from compile import checkpoints
    return checkpoints.load(real_gguf)


# the real 270M's exact xla artifact: one prefill length and a 256-token context hold every test
# that reads it (32 generated tokens, ~100-token logits) and compile two executables, not four
# larger ones, in its export's parity check, the tests' runtime and the TPU compile
REAL_XLA_LENGTHS, REAL_XLA_CONTEXT = (32,), 256


@pytest.fixture(scope="session")
def real_export(real_checkpoint):
    """(target, quant) -> the real 270M's artifact directory of that target alone. xla (exact)
    is one export (contract REAL_XLA_LENGTHS, REAL_XLA_CONTEXT); the default lossy forms
    (tflite int8, onnx native, default contract with its verify_8, as `compile.export` makes
    them with no flag: each must pass the quality gate, or the export fails) come from another, so the group
    traces and runs its references once; other quantizations accept the gate's verdict, which
    their manifests record. Each test gets a directory with its target alone
    (`artifacts.view`). (tflite and onnx `none` of the real model are not exported: each is
    80 CPU-s, and their export's own parity check against the JAX reference is what a test of
    them would repeat; the tiny models' fp32 artifacts are held to the reference.)"""
    from artifacts import exported, view
    from runtime import contract as ct

    def get(target: str, quant: str) -> Path:
        if target == "xla":
            art = exported("real", ["xla"], REAL_XLA_LENGTHS, REAL_XLA_CONTEXT,
                           options={"quant": "none"}, ck=real_checkpoint)
        elif (target, quant) in (("tflite", "int8"), ("onnx", "native")):
            art = exported("real", ["tflite", "onnx"], ck=real_checkpoint,
                           verify_lengths=ct.DEFAULT_VERIFY_LENGTHS)
        else:
            art = exported("real", [target], options={"quant": quant,
                                                      "accept_quality_loss": True},
                           ck=real_checkpoint)
        return view(art, target)
    return get


@pytest.fixture(scope="session")
def real_artifacts(real_export) -> Path:
    """The real 270M's exact xla artifact (contract REAL_XLA_LENGTHS, REAL_XLA_CONTEXT)."""
    return real_export("xla", "none")


@pytest.fixture(scope="session")
def real_tflite(real_export):
    """quant -> artifact directory of the real 270M's TFLite target (`real_export`)."""
    return lambda quant: real_export("tflite", quant)
