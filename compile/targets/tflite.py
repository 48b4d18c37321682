"""TFLite / LiteRT target: one multi-signature `.tflite` plus a LiteRT-LM `.litertlm` bundle.

Lowering, traced once per signature from shapes: each signature's function is `jax.export`-ed
for cpu with its weights as arguments, in the form this target stores them; `litert-converter`
(the converter litert-torch uses) parses that StableHLO, every weight argument becomes a constant
that references the weight's numpy buffer (`DenseResourceElementsAttr`, no copy, no MLIR text),
the same constant in every signature so that the flatbuffer stores it once, and the signatures are
merged and converted to TFLite builtin ops. `weights.tflite.finish` then turns the quantized matmul
weights into INT8/INT4 FULLY_CONNECTED weights and writes the file with its buffers after the
flatbuffer, streamed from the converter's file one buffer at a time. Neither TensorFlow nor a
float copy of a quantized model is involved.

Weight forms (`weight_forms`, filled one tensor at a time from the lazy checkpoint):
  matmul weights  stored [out, in] (the layout FULLY_CONNECTED reads; [in, out] would leave a
                  TRANSPOSE of every weight in every step, the converter does not fold constants);
                  `none`: float32; `int8`: per-channel int8 (dynamic range); `int4`: blockwise int4
                  (block 32, float16 scales), held packed, two values a byte — see
                  `weights.quant`
  embedding       `none` or `float_embedding`: float32 for the lookup and the output projection;
                  `int8`: one per-row int8 table with float scales serves both the lookup (GATHER,
                  then the row's scale in the graph) and the projection (INT8 per channel, the same
                  rows and scales), stored once; `int4`: the lookup per-row int8, the projection
                  blockwise int4
  expert stacks   Gemma 4's [E, in, out] stacks in the form LiteRT's MoE op reads
                  (`compile.litert_moe`, which owns that op's contract): rows [out, E, 1, in],
                  float32, per-row int8 or int4 blocks of 32 with float32 scales, one expert at
                  a time from the source; the graph passes them to the op untouched
  norms           float32
So memory holds the weights once, in their stored (quantized) form, plus the converter's copy.
The graph reads those forms through this module's `Forms` (`model.Forms`: the int8 lookups,
the MoE op), which `write` hands to each signature's `model.forward`.

Inputs and outputs keep the contract's names (`runtime.contract`), which are LiteRT-LM's. The V
cache is stored transposed ([1, K, H, S]) so both attention matmuls read the caches as they are: no
op copies or transposes a whole cache. Weights past the 2 GB flatbuffer limit need no special
case: every file is written with buffer offsets, which LiteRT loads.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from pathlib import Path

import numpy as np

from runtime import chat
from runtime import contract as ct

from .. import litert_moe, recipes, trace
from .. import model as gemma
from ..weights import FLOAT_FORMATS, format_of, nbytes_of
from ..weights.sources import Params, specs_of
from ..weights import quant as wq
from ..weights import tflite as container
from .forms import Lookups

NAME = "tflite"
QUANTS = ("none", "native", "int8", "int4")
EXACT_QUANTS = ("none", "native")   # native: only a float checkpoint, kept in float32
DEFAULT_QUANT = "int8"
RECIPES = recipes.NAMES   # --recipe: what is done to int8/int4 weights before they are quantized
TRACE_PLATFORMS = ()   # traced here, for cpu, from the weight forms this target stores
# lora_* signatures beside prefill_N/decode, sharing their weights; the base ones take no slot
# input, so LiteRT-LM's engine runs the `.litertlm` as before (it would leave unknown inputs unset)
LORA_SIGNATURES = True


def check_options(options: dict) -> None:
    """Before any work: the converter is installed (it comes without its dependencies), and a
    recipe is asked for only where weights are quantized."""
    quant, recipe = options.get("quant") or DEFAULT_QUANT, options.get("recipe")
    if recipe and recipe != "plain" and quant in EXACT_QUANTS:
        raise ValueError(f"--recipe {recipe}: tflite --quant {quant} keeps the weights in float, "
                         f"which no recipe changes; recipes apply to int8 and int4")
    if recipe == recipes.GPTQ and quant != "int8":
        raise ValueError(f"--recipe {recipe}: GPTQ rounds to per-row int8; with --quant {quant} "
                         f"use rotate-smooth")
    try:
        import litert_converter  # noqa: F401
    except ImportError:
        raise ValueError("the tflite target needs litert-converter: pip install --no-deps "
                         "litert-converter==0.5.0 (see pyproject.toml's tflite extra)") from None


def check_checkpoint(params, options: dict) -> None:
    """Before any work: `native` keeps a checkpoint's own formats, and LiteRT's kernels have no
    form for GGUF's blocks (XNNPACK takes per-channel int8 and symmetric 4-bit blocks with bf16
    scales; no 5/6/8-bit blocks, no per-block offsets), so a block-quantized tensor is refused by
    name; a float checkpoint stays float32."""
    if (options.get("quant") or DEFAULT_QUANT) != "native":
        return
    for name in params:
        fmt = format_of(params, name)
        if fmt not in FLOAT_FORMATS:
            raise ValueError(f"--quant native: tensor {name} is stored as {fmt}, which the tflite "
                             f"target cannot keep (LiteRT's kernels take per-channel int8 and "
                             f"symmetric 4-bit blocks only); targets that can take it: onnx, xla "
                             f"(as float32); or choose --quant none, int8 or int4 for tflite")


PLE_BLOCK = 32   # values per scale of the per-layer embedding table's int8 lookup copy
TENSOR_ELEMENTS = 2**31 - 1   # TFLite kernels count a tensor's elements in int32


def quantized_names(params, quant: str, float_embedding: bool) -> set[str]:
    """The matmul weights `weight_forms` quantizes ("embed": the output projection)."""
    if quant not in ("int8", "int4"):
        return set()
    specs = specs_of(params)
    out = {n for n in params if gemma.is_linear(n) and not gemma.keeps_float(n)
           and not (quant == "int4" and specs[n][0][0] % wq.INT4_BLOCK)}
    return out | ({"embed"} if not float_embedding else set())


def weight_forms(params, quant: str, float_embedding: bool, tick=None,
                 recipe: recipes.Recipe | None = None
                 ) -> tuple[dict[str, np.ndarray], dict[str, container.Quantized]]:
    """The graph's constants (name -> array in its stored form) and, for each quantized matmul
    weight, how it was quantized. Reads `params` one tensor at a time; `recipe` transforms each
    weight and norm before it is quantized (`compile.recipes`)."""
    recipe = recipe or recipes.Recipe()
    consts: dict[str, np.ndarray] = {}
    quantized: dict[str, container.Quantized] = {}
    specs = specs_of(params)
    matmuls = quantized_names(params, quant, float_embedding)
    for name in params:
        if name == "ple_embed" and quant != "none":
            # Gemma 4's per-layer table: an int8 lookup in blocks, one row gathered per token,
            # in column parts that TFLite's int32 element counts can address
            parts = wq.int8_table_parts(params, name, PLE_BLOCK, TENSOR_ELEMENTS)
            for c, (q, scale) in enumerate(parts):
                part = "ple_embed" + ("" if len(parts) == 1 else str(c))
                consts[part + "_q"], consts[part + "_scale"] = q, scale
            del parts
            if tick:
                tick()
            continue
        if gemma.is_experts(name):
            # Gemma 4's expert stacks: LiteRT's MoE op reads the chosen experts' rows itself
            prefix = name.rsplit(".", 1)[0] + "."
            wt = litert_moe.weight_type(quant, {k: specs[prefix + k][0]
                                                for k in litert_moe.KEYS})
            w, scale = litert_moe.stored_form(_part_reader(params, name), specs[name][0], wt)
            consts[name + litert_moe.SUFFIX] = w
            if scale is not None:
                consts[name + litert_moe.SUFFIX + "_scale"] = scale
            del w, scale
            if tick:
                tick()
            continue
        rounded = recipe.int8(name) if quant == "int8" else None
        if rounded is not None:   # the recipe's own rounding (GPTQ) of its stored form
            consts[name], scale = rounded
            quantized[name] = container.Quantized("int8", scale)
            if tick:
                tick()
            continue
        w = recipe.transform(name, params[name])
        if gemma.is_linear(name) and name not in matmuls:
            # float: nothing quantized, the expert router, or inputs too few for one int4 block
            # (a tiny model's 8-wide PLE) (`quantized_names`): [out, in]
            consts[name] = np.ascontiguousarray(np.asarray(w, np.float32).T)
        elif gemma.is_linear(name) or name == "embed":
            rows = np.ascontiguousarray(np.asarray(w, np.float32).T if name != "embed" else w,
                                        np.float32)                            # [out, in]
            del w
            if name == "embed" and quant != "none" and not float_embedding:
                q8, s8 = wq.int8_rows(rows)
                consts["embed_q"], consts["embed_scale"] = q8, s8
            if quant == "none" or (name == "embed" and float_embedding):
                consts[name] = rows
            elif quant == "int8":
                consts[name], scale = (consts["embed_q"], consts["embed_scale"]) \
                    if name == "embed" else wq.int8_rows(rows)
                quantized[name] = container.Quantized("int8", scale)
            else:
                q, scale = wq.int4_blocks(rows, wq.INT4_BLOCK)
                consts[name] = wq.pack_int4(q).view(np.int8).reshape(q.shape[0], -1)  # [N, K/2]
                del q
                quantized[name] = container.Quantized("int4", scale, wq.INT4_BLOCK)
        else:
            consts[name] = np.ascontiguousarray(w, np.float32)
        if tick:
            tick()
    return consts, quantized


def _part_reader(params, name: str):
    """Reads expert e of the stack `name` alone where the source can."""
    if isinstance(params, Params):
        return params.tensors[name].get_part
    stack = params[name]
    return lambda e: stack[e]


def graph_fn(fn, packed=frozenset()):
    """The traced signature function `fn(params, inputs)` over the stored forms: matmul weights
    back to [in, out] float (a CAST and a transpose the converter folds into FULLY_CONNECTED).
    A `packed` (int4) weight is [N, K/2] bytes: a CONCATENATION of its CAST gives the [N, K]
    the matmul is typed with; `weights.tflite` replaces the pair by the packed constant."""
    import jax.numpy as jnp

    def f(weights, inputs):
        p = {}
        for k, v in weights.items():
            if k in packed:
                v = v.astype(jnp.float32)
                v = jnp.concatenate([v, v], axis=1)                               # [N, K]
            if gemma.is_linear(k):
                p[k] = v.astype(jnp.float32).T
            elif k == "embed":
                p[k] = v.astype(jnp.float32)
            else:
                p[k] = v
        return fn(p, inputs)

    f.__name__ = fn.__name__
    return f


class Forms(Lookups):
    """What this target hands `model.forward`: the int8 lookups among its constants, Gemma 4's
    experts as LiteRT's MoE op (`litert_moe`, which applies the expert scale itself) where the
    constants hold the op's stored form, and the quantization recipe's rotations and scales
    (`compile.recipes`) around the matmuls and the lookup it transformed."""

    def __init__(self, names, recipe: recipes.Recipe | None = None):
        super().__init__(names)
        self.moe_op = any(n.endswith("experts_gate" + litert_moe.SUFFIX) for n in names)
        self.recipe = recipe or recipes.Recipe()

    def project(self, x, p, name, layer):
        if self.recipe.covers(layer, name):
            return self.recipe.project(x, p, name, layer)
        return super().project(x, p, name, layer)

    def logits(self, x, table):
        return self.recipe.logits(x, table)

    def embed_rows(self, params, tokens):
        return self.recipe.lookup(super().embed_rows(params, tokens))

    def experts(self, cfg, p, h, w, idx, dtype):
        if not self.moe_op:
            return super().experts(cfg, p, h, w, idx, dtype)
        return litert_moe.experts(h, w, idx, p, cfg.num_experts, cfg.top_k_experts).astype(dtype)


def convert(traced, consts: dict, path: Path, progress=None, quantized=None) -> None:
    """Writes the converter's flatbuffer (one signature per traced signature) to `path`. A
    constant shared by several names (the int8 embedding: lookup and projection) is named after
    the one in `quantized`."""
    import jax
    from runtime.backends.base import quiet_native_logs
    with quiet_native_logs():   # loading TensorFlow's kernels logs absl and oneDNN INFO lines
        from litert_converter.mlir import ir, passmanager
        from litert_converter.mlir.dialects import arith
        from litert_converter.mlir._mlir_libs import converter_api_ext as conv

    quantized = quantized or {}
    wspecs = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in consts.items()}
    bar = progress(total=len(traced) + 1, desc="tflite trace+convert", unit="step") \
        if progress else None
    ctx = ir.Context()
    conv.prepare_mlir_context(ctx)
    attrs: dict[int, object] = {}    # id(array) -> its constant attribute, shared by signatures
    owner = {id(consts[k]): k for k in quantized}
    packed = frozenset(k for k, q in quantized.items() if q.kind == "int4")
    label = {k: owner.get(id(v), k) for k, v in consts.items()}
    with ctx, ir.Location.unknown():
        def attr(a: np.ndarray):
            if id(a) not in attrs:
                elem = ir.IntegerType.get_signless(8) if a.dtype == np.int8 else ir.F32Type.get()
                attrs[id(a)] = ir.DenseResourceElementsAttr.get_from_buffer(
                    a, f"w{len(attrs)}", ir.RankedTensorType.get(a.shape, elem))
            return attrs[id(a)]

        modules = []
        # decode first: the interpreter's primary subgraph is the one that has every weight
        order = sorted(traced.items(), key=lambda kv: kv[1].signature.kind != ct.DECODE)
        for name, t in order:
            with litert_moe.emitting():   # Gemma 4's experts as LiteRT's MoE op
                exported = jax.export.export(
                    jax.jit(graph_fn(t.fn, packed)), platforms=("cpu",),
                    disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("tfl.custom")])(
                    wspecs, {s.name: jax.ShapeDtypeStruct(s.shape, np.dtype(s.dtype))
                             for s in t.signature.inputs})
            flat = jax.tree_util.tree_leaves(({k: k for k in wspecs},
                                              {s.name: s.name for s in t.signature.inputs}))
            args = [flat[i] for i in sorted(exported.module_kept_var_idx)]
            module = ir.Module.parse(exported.mlir_module())
            _bind_weights(module, args, consts, label, attr, arith, ir)
            outputs = jax.tree_util.tree_leaves(
                {s.name: s.name for s in t.signature.outputs})
            conv.set_signature(module.operation, signature_name=name,
                               input_names=[a for a in args if a not in consts],
                               output_names=outputs)
            modules.append(module)
            if bar:
                bar.update()
        merged = conv.merge_modules(modules)
        config = conv.ConvertToTFLConfig()
        config.canonicalizing_inf_as_min_max_float = False   # keep -inf/finfo.min masks as they are
        conv.run_convert_to_tfl_passes(merged, passmanager.PassManager(), config)
        conv.export_flatbuffer_to_file(merged.operation, str(path))
        del merged, modules
    if bar:
        bar.update()
        bar.close()


def _bind_weights(module, args: list[str], consts: dict, label: dict, attr, arith, ir) -> None:
    """Replaces the weight arguments of the module's `main` by constants, named for
    `weights.tflite` (`w:<parameter>`)."""
    main = next(op for op in module.body.operations if op.operation.name == "func.func"
                and ir.StringAttr(op.attributes["sym_name"]).value == "main")
    block = main.regions[0].blocks[0]
    if len(block.arguments) != len(args):
        raise RuntimeError(f"tflite: main takes {len(block.arguments)} arguments, the traced "
                           f"signature {len(args)}")
    made = {}   # one constant op per array: merged ones would lose their names
    with ir.InsertionPoint.at_block_begin(block):
        for j, name in enumerate(args):
            if name in consts:
                key = id(consts[name])
                if key not in made:
                    a = attr(consts[name])
                    made[key] = arith.ConstantOp(
                        a.type, a, loc=ir.Location.name(container.constant_name(label[name])))
                block.arguments[j].replace_all_uses_with(made[key].result)
    for j in reversed(range(len(args))):
        if args[j] in consts:
            block.erase_argument(j)
    results = ir.FunctionType(ir.TypeAttr(main.attributes["function_type"]).value).results
    main.attributes["function_type"] = ir.TypeAttr.get(
        ir.FunctionType.get([a.type for a in block.arguments], results))
    if "arg_attrs" in main.attributes:
        kept = [a for j, a in enumerate(ir.ArrayAttr(main.attributes["arg_attrs"]))
                if args[j] not in consts]
        main.attributes["arg_attrs"] = ir.ArrayAttr.get(kept)


def write(traced, params, out_dir: Path, options: dict, progress=None) -> dict:
    quant = options.get("quant") or DEFAULT_QUANT
    if quant not in QUANTS:
        raise ValueError(f"tflite: unsupported quantization {quant!r}; choose one of "
                         f"{', '.join(QUANTS)}")
    # native: a float checkpoint (export refused a block-quantized one), kept as it is
    stored = "none" if quant == "native" else quant
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="tflite-", dir=out_dir.parent))
    float_embedding = bool(options.get("float_embedding"))
    contract = next(iter(traced.values())).contract
    try:
        recipe = recipes.plan(recipe_name(options, stored), contract.config,
                              quantized_names(params, stored, float_embedding), params,
                              Path(options["tokenizer_path"]).read_bytes(),
                              options["special_ids"]["bos"], progress)
        bar = progress(total=len(params), desc=f"tflite weights ({quant})", unit="tensor") \
            if progress else None
        consts, quantized = weight_forms(params, stored, float_embedding,
                                         bar.update if bar else None, recipe)
        if bar:
            bar.close()
        # each signature over the stored forms (`Forms`: the int8 lookups, the MoE op, the
        # recipe's rotations and scales)
        forms = Forms(consts, recipe)
        traced = {name: dataclasses.replace(t, fn=trace.signature_fn(t.contract, t.signature,
                                                                     forms))
                  for name, t in traced.items()}
        convert(traced, consts, work / "converted.tflite", progress, quantized)
        del consts
        counts = container.finish(work / "converted.tflite", out_dir / "model.tflite", quantized)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    bundle_name = f"{contract.config.name}-{stored}.litertlm"
    bundle(out_dir / "model.tflite", Path(options["tokenizer_path"]), options["special_ids"],
           contract, out_dir / bundle_name)
    return {"files": {"model": "model.tflite", "litertlm": bundle_name}, "quantization": quant,
            "float_embedding": float_embedding, "recipe": recipe.record(),
            "weights_bytes_fp32": nbytes_of(params), **counts}


def recipe_name(options: dict, stored: str) -> str:
    """The recipe asked for, or the default (`recipes.DEFAULT`: rotate-smooth-gptq for int8,
    rotate-smooth for int4); a float artifact quantizes nothing: any recipe is plain there. Real
    270M, the gate's slice: int8 89.1 % top-1 plain, 96.1 % rotate, 96.5 % rotate-smooth (KL
    0.0034-0.0043), 96.5 % rotate-smooth-gptq (KL 0.0028); int4 52.5 %, 62.9 %, 69.5 %."""
    if stored == "none":
        return "plain"
    return options.get("recipe") or recipes.DEFAULT[stored]


def llm_metadata(special: dict, contract, markers: tuple[str, str] = chat.TURN_MARKERS[0]
                 ) -> bytes:
    """LiteRT-LM's LlmMetadata: start and stop tokens, Gemma's turn templates spelled with the
    vocabulary's turn `markers` (one pair of `runtime.chat.TURN_MARKERS`), max tokens."""
    from litert_lm_builder.runtime.proto import llm_metadata_pb2
    md = llm_metadata_pb2.LlmMetadata()
    md.start_token.token_ids.ids.append(int(special["bos"]))
    for stop in (special["eos"], special["end_of_turn"]):
        md.stop_tokens.add().token_ids.ids.append(int(stop))
    start, end = markers
    md.prompt_templates.user.prefix = chat.turn_prefix(chat.USER, start)
    md.prompt_templates.user.suffix = chat.turn_suffix(end)
    md.prompt_templates.model.prefix = chat.turn_prefix(chat.MODEL, start)
    md.prompt_templates.model.suffix = chat.turn_suffix(end)
    md.max_num_tokens = contract.max_context
    if contract.config.family == 3:
        md.llm_model_type.gemma3.SetInParent()
    else:
        md.llm_model_type.generic_model.SetInParent()
    md.supports_thinking = False
    md.supports_function_calling = False
    return md.SerializeToString()


def engine_tokenizer(model_proto: bytes, special: dict) -> bytes:
    """The tokenizer for LiteRT-LM's engine: its prompt templates (and the Android app's prompts)
    spell the turn markers as text, so the start/end-of-turn markers must be USER_DEFINED
    pieces, matched in text, as in Gemma's own tokenizer. (GGUF types them CONTROL, which
    SentencePiece never produces from text; our runtime inserts them as ids instead.)"""
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2
    m = sp_pb2.ModelProto()
    m.ParseFromString(model_proto)
    for key in ("start_of_turn", "end_of_turn"):
        m.pieces[int(special[key])].type = sp_pb2.ModelProto.SentencePiece.USER_DEFINED
    return m.SerializeToString()


def turn_pieces(model_proto: bytes, special: dict) -> tuple[str, str]:
    """The vocabulary's start- and end-of-turn pieces (one pair of `runtime.chat.TURN_MARKERS`)."""
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2
    m = sp_pb2.ModelProto()
    m.ParseFromString(model_proto)
    return (m.pieces[int(special["start_of_turn"])].piece,
            m.pieces[int(special["end_of_turn"])].piece)


def bundle(tflite_path: Path, tokenizer_path: Path, special: dict, contract, out: Path) -> None:
    """A `.litertlm` file (litert-lm-builder): the TFLite model, the engine's SentencePiece
    tokenizer and LlmMetadata, as LiteRT-LM's engine and the Android app load it."""
    from litert_lm_builder import litertlm_builder as lb
    from litert_lm_builder import litertlm_core
    proto = tokenizer_path.read_bytes()
    md_path = out.with_name(out.name + ".llm_metadata.pb")
    md_path.write_bytes(llm_metadata(special, contract, turn_pieces(proto, special)))
    tok_path = out.with_name(out.name + ".tokenizer.model")
    tok_path.write_bytes(engine_tokenizer(proto, special))
    try:
        b = lb.LitertLmFileBuilder()
        b.add_system_metadata(lb.Metadata(key="model", value=contract.config.name,
                                          dtype=lb.DType.STRING))
        b.add_system_metadata(lb.Metadata(key="producer", value="gemma-aot",
                                          dtype=lb.DType.STRING))
        b.add_tflite_model(str(tflite_path), lb.TfLiteModelType.PREFILL_DECODE)
        b.add_sentencepiece_tokenizer(str(tok_path))
        b.add_llm_metadata(str(md_path))
        with litertlm_core.open_file(str(out), "wb") as f:
            b.build(f, validate_metadata=True)
    finally:
        md_path.unlink(missing_ok=True)
        tok_path.unlink(missing_ok=True)
