"""The weight pipeline: every tensor passes through memory once, on its way into an artifact.

  sources      lazy tensors: a checkpoint's tensors are read (GGUF through its memory map,
               safetensors by plain reads per tensor, sharded files alike), dequantized and
               transformed into the model's layout one at a time, when asked for (`Params`)
  safetensors  reading a safetensors header with checks that name the file and tensor, and writing
               a safetensors file tensor by tensor (header first, then each tensor as it arrives)
  quant        the streaming quantizer (numpy, one tensor at a time): per-row int8, blockwise int4;
               `Blocks`, the one blockwise format every container writes from
  gguf_blocks  a GGUF tensor's own blocks (Q8_0, Q5_0, Q4_K, Q6_K, ...) decoded into `Blocks`
               without changing a value (`--quant native`)
  onnx         the ONNX container: external data, `Blocks` into MatMulNBits
  tflite       the TFLite container: quantized weights into FULLY_CONNECTED, buffers written after
               the flatbuffer one at a time

Nothing in the pipeline holds the whole float model: `Params` is a mapping whose values are
produced on access and not kept; its `specs()` give every shape and dtype without reading a byte.
"""

from .quant import int4_blocks, int8_rows, pack_int4
from .sources import (FLOAT_FORMATS, Params, Tensor, expert_name, float32_record, format_of,
                      nbytes_of, row_chunks, seeded, specs_of, split_experts, take_rows)

__all__ = ["FLOAT_FORMATS", "Params", "Tensor", "expert_name", "float32_record", "format_of",
           "int4_blocks", "int8_rows", "pack_int4", "nbytes_of", "row_chunks", "seeded",
           "specs_of", "split_experts", "take_rows"]
