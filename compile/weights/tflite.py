"""TFLite container writer: quantized weights into FULLY_CONNECTED ops, buffers streamed to disk.

The converter (`litert-converter`) is handed every weight as a graph constant in its stored
form, named `w:<parameter>` so the flatbuffer's tensor names say which parameter a constant holds:
float32; for an int8 matmul weight its int8 values [N, K] behind a CAST to float; for an int4 one
its packed bytes [N, K/2] (two values a byte) behind a CAST and a CONCATENATION that give the
converter a float [N, K] to type the matmul with. `finish` then rewrites the converted flatbuffer:

  * every FULLY_CONNECTED whose weight is computed from w:<p> for a quantized parameter p (through
    those ops only, read by nothing else) reads the constant directly, typed INT8 with per-channel
    scales (dynamic-range int8) or INT4 [N, K] with a float16 scales tensor per block
    (`BlockwiseQuantization`), which LiteRT's FULLY_CONNECTED kernels (builtin and XNNPACK) run
    as hybrid matmuls; the ops in between are removed. Every quantized parameter must end up read
    that way, or the rewrite fails (what the placeholder ops compute is not the weight).
  * custom ops' options that a converter file over 2 GB keeps outside the flatbuffer (LiteRT's
    MoE op) go back inside it, since every buffer moves;
  * the flatbuffer is written without its buffers (each buffer records an offset and size in the
    file, the format LiteRT uses for models over 2 GB), followed by each buffer's bytes, copied one
    buffer at a time from the converter's file through a memory map. So the rewrite never holds
    the model: only the small flatbuffer and one buffer.
"""

from __future__ import annotations

import gc
import mmap
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np


PREFIX = "w:"            # the location name of a weight constant: "w:layers.0.q_proj"
ALIGN = 64               # buffer alignment in the file (XNNPACK reads weights in place)
_NAME = re.compile(r"w:(.+?)\d*")   # the exporter appends a count to repeated names


def constant_name(param: str) -> str:
    if param[-1:].isdigit():
        raise ValueError(f"weight name {param!r} ends in a digit; the flatbuffer's tensor names "
                         f"could not be told apart from the exporter's counters")
    return PREFIX + param


@dataclass(frozen=True)
class Quantized:
    """How a matmul weight [out, in] was quantized: 'int8' (scale [out] float32) or 'int4'
    (scale [out, in / block] float16)."""
    kind: str
    scale: np.ndarray
    block: int = 0


def _schema():
    from litert_converter import schema_py_generated as S
    return S


def _opcode(model, op) -> int:
    c = model.operatorCodes[op.opcodeIndex]
    return max(c.deprecatedBuiltinCode, c.builtinCode)


def _param_of(tensor) -> str | None:
    m = _NAME.fullmatch(tensor.name.decode(errors="replace")) if tensor.name else None
    return m.group(1) if m else None


def finish(src: Path, dst: Path, quantized: dict[str, Quantized]) -> dict:
    """Rewrites the converter's flatbuffer `src` into `dst` (see the module doc). Returns counts
    for the manifest: rewritten matmuls and bytes of weights by type."""
    S = _schema()
    with open(src, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        model = S.ModelT.InitFromPackedBuf(mm, 0)
        sources = [_source(mm, b) for b in model.buffers]     # (offset, size) in src, or None
        new_data: dict[int, np.ndarray] = {}                   # buffer index -> replacement bytes
        done = _rewrite(S, model, quantized, sources, new_data)
        _inline_custom_options(model, mm)
        _write(S, model, mm, sources, new_data, Path(dst))
        return done
    finally:
        model = None   # its numpy views (shapes, names) point into the map
        gc.collect()
        try:
            mm.close()
        except BufferError:   # a view still alive (e.g. in a traceback): the map goes with it
            pass


def _inline_custom_options(model, mm) -> None:
    """A converter file over 2 GB keeps each custom op's options after the flatbuffer
    (`large_custom_options_offset/size`, from the file's start); the rewritten file moves every
    buffer, so they go back inside the flatbuffer (a few hundred bytes each: LiteRT's MoE op)."""
    for sg in model.subgraphs:
        for op in sg.operators:
            if op.largeCustomOptionsSize:
                start, size = int(op.largeCustomOptionsOffset), int(op.largeCustomOptionsSize)
                if start + size > len(mm):
                    raise ValueError(f"tflite: custom options at {start}+{size} lie past the "
                                     f"converter's file ({len(mm)} bytes)")
                op.customOptions = np.frombuffer(bytes(mm[start:start + size]), np.uint8)
                op.largeCustomOptionsOffset = op.largeCustomOptionsSize = 0


def _source(mm, buf) -> tuple[int, int] | None:
    if buf.data is not None and len(buf.data):
        # a view into the map: its position is the buffer's offset in the file
        start = buf.data.__array_interface__["data"][0] - _base(mm)
        return start, len(buf.data)
    if buf.offset > 1:
        return buf.offset, buf.size
    return None


def _base(mm) -> int:
    return np.frombuffer(mm, np.uint8, count=1).__array_interface__["data"][0]


# ops through which the graph turns a stored weight into the float matrix a matmul reads; the
# rewrite removes them (int8: a CAST; int4: a CAST and a CONCATENATION that widens the packed
# [N, K/2] bytes to [N, K]; TRANSPOSE/RESHAPE should the converter leave one)
_CHAIN = ("CAST", "CONCATENATION", "TRANSPOSE", "RESHAPE")


def _root(S, model, sg, producer, readers, t: int):
    """(constant tensor index, ops between it and `t`) when `t` is computed from one constant
    through `_CHAIN` ops that nothing else reads; else None."""
    chain = []
    codes = {getattr(S.BuiltinOperator, n) for n in _CHAIN}
    concat = S.BuiltinOperator.CONCATENATION
    while True:
        op = producer.get(t)
        if op is None:
            return t, chain
        if _opcode(model, op) not in codes or (chain and readers.get(t, 0) != 1):
            return None
        ins = [i for i in op.inputs if i >= 0]
        if _opcode(model, op) == concat and len(set(ins)) != 1:
            return None
        chain.append(op)
        t = ins[0]


def _rewrite(S, model, quantized, sources, new_data) -> dict:
    fc = S.BuiltinOperator.FULLY_CONNECTED
    rewritten: dict[str, int] = {}
    scale_buffers: dict[str, int] = {}
    for sg in model.subgraphs:
        producer = {o: op for op in sg.operators for o in op.outputs}
        readers: dict[int, int] = {}           # how many ops (and subgraph outputs) read a tensor
        for op in sg.operators:
            for i in set(op.inputs):
                readers[i] = readers.get(i, 0) + 1
        for i in sg.outputs:
            readers[i] = readers.get(i, 0) + 1
        drop = set()
        for op in sg.operators:
            if _opcode(model, op) != fc or len(op.inputs) < 2:
                continue
            found = _root(S, model, sg, producer, readers, op.inputs[1])
            if found is None or not found[1]:
                continue
            root, chain = found
            w = sg.tensors[root]
            name = _param_of(w)
            if name not in quantized or sources[w.buffer] is None:
                continue
            N, K = (int(d) for d in sg.tensors[op.inputs[1]].shape)
            _quantize_tensor(S, model, sg, w, name, quantized[name], (N, K), scale_buffers,
                             sources, new_data)
            op.inputs = np.array(op.inputs)    # a read-only view into the map
            op.inputs[1] = root
            drop.update(id(c) for c in chain)
            rewritten[name] = rewritten.get(name, 0) + 1
        sg.operators = [op for op in sg.operators if id(op) not in drop]
        _check_readers(S, model, sg, quantized)
    missing = sorted(set(quantized) - set(rewritten))
    if missing:
        raise ValueError(f"tflite: no matmul reads {', '.join(missing[:5])}"
                         f"{' …' if len(missing) > 5 else ''}; cannot quantize them")
    return {"quantized_matmuls": sum(rewritten.values()), "quantized_weights": len(rewritten)}


def _quantize_tensor(S, model, sg, w, name, q, shape, scale_buffers, sources, new_data) -> None:
    """Gives the int8 constant `w` (a matmul's [N, K] weight) the quantization of `q`: int8
    per-channel scales, or int4 blockwise with its fp16 scales in a tensor of their own (one
    buffer per weight, shared by the signatures that read it)."""
    N, K = shape
    if w.type != S.TensorType.INT8:
        raise ValueError(f"tflite: {name}: constant of type {w.type}, expected int8")
    if q.kind == "int8":
        w.quantization = S.QuantizationParametersT(
            scale=np.asarray(q.scale, np.float32),
            zeroPoint=np.zeros(N, np.int64), quantizedDimension=0)
    elif q.kind == "int4":
        if tuple(int(d) for d in w.shape) == (N, K // 2):
            w.shape = np.asarray([N, K], np.int32)        # packed: two values a byte
        if name not in scale_buffers:
            model.buffers.append(S.BufferT())
            scale_buffers[name] = len(model.buffers) - 1
            sources.append(None)
            new_data[scale_buffers[name]] = np.ascontiguousarray(q.scale, np.float16)
        st = S.TensorT(shape=np.asarray(q.scale.shape, np.int32), type=S.TensorType.FLOAT16,
                       buffer=scale_buffers[name], name=(w.name + b"_scales"))
        sg.tensors.append(st)
        details = S.BlockwiseQuantizationT()
        details.scales, details.zeroPoints, details.blockSize = \
            len(sg.tensors) - 1, -1, q.block
        w.type = S.TensorType.INT4
        w.quantization = S.QuantizationParametersT(
            detailsType=S.QuantizationDetails.BlockwiseQuantization, details=details,
            quantizedDimension=0)
    else:
        raise ValueError(f"tflite: {name}: unknown quantization {q.kind!r}")
    if tuple(int(d) for d in w.shape) != (N, K):
        raise ValueError(f"tflite: {name}: stored {list(w.shape)}, the matmul reads "
                         f"[{N}, {K}]")


def _check_readers(S, model, sg, quantized) -> None:
    """Nothing but a matmul (or the embedding lookup) may read a quantized weight."""
    allowed = (S.BuiltinOperator.FULLY_CONNECTED, S.BuiltinOperator.GATHER,
               S.BuiltinOperator.GATHER_ND)
    for op in sg.operators:
        for i in op.inputs:
            name = _param_of(sg.tensors[i]) if i >= 0 else None
            if name in quantized and _opcode(model, op) not in allowed:
                raise ValueError(f"tflite: {name} is read by an op other than a matmul; "
                                 f"cannot quantize it")


def _write(S, model, mm, sources, new_data, dst: Path) -> None:
    import flatbuffers
    sizes = {}
    inline = {md.buffer for md in model.metadata or []}   # small: kept inside the flatbuffer
    for i, b in enumerate(model.buffers):
        b.data = None
        if i in inline:
            b.offset, b.size = 0, 0
            if sources[i] is not None:
                start, size = sources[i]
                b.data = np.frombuffer(bytes(mm[start:start + size]), np.uint8)
        elif i in new_data:
            sizes[i] = new_data[i].nbytes
        elif sources[i] is not None:
            sizes[i] = sources[i][1]
    # pack once with placeholder offsets (stored as uint64 whatever their value) to learn the
    # flatbuffer's size, then again with the real offsets: the two packings have the same size
    for i, b in enumerate(model.buffers):
        if i not in inline:
            b.offset, b.size = 0, 0
    for i in sizes:
        model.buffers[i].offset, model.buffers[i].size = 2, sizes[i]
    head = _pack(S, flatbuffers, model)
    offset = _align(len(head))
    for i in sorted(sizes):
        model.buffers[i].offset = offset
        offset = _align(offset + sizes[i])
    head2 = _pack(S, flatbuffers, model)
    if len(head2) != len(head):
        raise RuntimeError("tflite: the flatbuffer changed size between packings")
    tmp = dst.with_name(dst.name + ".partial")
    try:
        with open(tmp, "wb") as f:
            f.write(head2)
            for i in sorted(sizes):
                b = model.buffers[i]
                f.write(b"\0" * (b.offset - f.tell()))
                if i in new_data:
                    f.write(new_data[i].view(np.uint8).reshape(-1).data)
                else:
                    start, size = sources[i]
                    f.write(mm[start:start + size])
                    mm.madvise(mmap.MADV_DONTNEED, start - start % mmap.PAGESIZE,
                               size + start % mmap.PAGESIZE)
            f.write(b"\0" * (_align(f.tell()) - f.tell()))
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _pack(S, flatbuffers, model) -> bytes:
    b = flatbuffers.Builder(1 << 20)
    b.Finish(model.Pack(b), file_identifier=b"TFL3")
    return bytes(b.Output())


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN
