#!/usr/bin/env python3
"""Build the Phi-3-mini-shaped benchmark model (random int4 weights) with numpy + onnx only.

Writes a genuine Phi-3-architecture ONNX Runtime GenAI folder at full Phi-3-mini-4k size
(hidden 3072, 32 layers, 32 heads / 32 kv heads of 96, intermediate 8192, vocab 32064,
context 4096) into .models/phi3-mini-int4/ (default):

    phi3-mini-4k-instruct-cpu-int4-rtn-block-32-acc-level-4.onnx  (+ .onnx.data, ~2.7 GB)
    genai_config.json  tokenizer.json  tokenizer_config.json  special_tokens_map.json

It replaces `tests/gen/make_model.py --preset phi3-mini` (torch + transformers +
onnxruntime-genai's builder, ~4 min, 8.6 GB peak RSS, 23 GB of temporary files) for the
benchmarks: same shape, same graph and the same weight bytes per tensor, but the random int4
weights are drawn directly (no fp32 weights are ever materialized, so no RTN step), and the
external-data file is written one tensor at a time (peak RSS a few hundred MB).

The graph is node for node what onnxruntime-genai 0.18.0's builder writes for Phi-3 on CPU
at int4 (compare the committed tests/fixtures/models/phi3-tiny-gqa, made by that builder):
inputs `input_ids`, `attention_mask`, `past_key_values.N.key/value` (no position_ids) ->
`logits`, `present.N.key/value`; seqlens_k = ReduceSum(attention_mask) - 1 and
total_sequence_length = Shape(attention_mask)[1] (int32); an fp32 embedding table read by
Gather; SimplifiedLayerNormalization / SkipSimplifiedLayerNormalization (epsilon 1e-5); per
layer one packed q|k|v MatMulNBits -> com.microsoft.GroupQueryAttention (do_rotary=1,
rotary_interleaved=0, cos_cache/sin_cache [4096, 48], theta 10000, local_window_size -1,
softcap 0) -> o_proj MatMulNBits; MLP gate/up MatMulNBits, SiLU as Sigmoid + Mul, down
MatMulNBits; int4 MatMulNBits lm_head.  Every MatMulNBits is 4-bit, block 32, symmetric (no
zero_points input), accuracy_level 4 (the builder's CPU default).  Initializer names and the
order of the tensors in the .onnx.data file follow the builder's; value_info is written for
initializers and intermediate tensors as the builder does.  (cos/sin are computed in float64
and rounded to float32; the builder's torch float32 cos/sin differ from that by at most one
ulp on a few entries.)

Weights, each tensor from its own generator seeded with (seed, crc32(name)), so a run with the
same options writes byte-identical files:
* int4 weights: uniformly random nibbles, except that nibble 0 (value -8) is replaced by 8
  (value 0), so the de-quantized values scale * (q - 8) are symmetric around 0 (q - 8 in
  -7..7); scales per block of 32 are init_scale / sqrt(E[(q-8)^2]) times a uniform factor in
  [0.75, 1.25), so the weights have about the standard deviation of a Hugging Face init with
  initializer_range = init_scale (0.02, Phi-3's), as the old preset had;
* embedding: normal(0, init_scale) fp32; layer norm weights 1; lm_head like the other
  weights, times --lm-head-scale (1 by default, as the old preset).
With these, activations stay finite and greedy decoding gives varied, non-constant tokens.

Usage:
    .venv/test/bin/python tests/gen/phi3_mini.py [--out DIR] [--seed N] [--layers N]
        [--init-scale S] [--lm-head-scale S] [--accuracy-level {0,1,2,3,4}]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import shutil
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

HERE = Path(__file__).resolve().parent


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# graph writer and RoPE tables of the numpy+onnx SmolLM2 exporter; preset, decoder file name
# and tokenizer location of the torch-based builder script (both import only numpy/onnx/stdlib
# at module level)
_export = _load("edgeflow_smollm2_export", HERE / "smollm2" / "export.py")
_make_model = _load("edgeflow_make_model", HERE / "make_model.py")
Graph, hf_inv_freq, BLOCK, MS = _export.Graph, _export.hf_inv_freq, _export.BLOCK, _export.MS
PRESET = _make_model.PRESETS["phi3-mini"]
TOKENIZER_DIR, TOKENIZER_FILES = _make_model.TOKENIZER_DIR, _make_model.TOKENIZER_FILES
CONFIG_TEMPLATE = _make_model.PRESETS["tiny-gqa"]["out"] / "genai_config.json"

VOCAB = 32064
CONTEXT = 4096
THETA = 10000.0
EPS = 1e-5
# E[(q - 8)^2] for q uniform over 0..15 with 0 replaced by 8: (2 * (1 + 4 + ... + 49)) / 16
NIBBLE_VAR = 2 * sum(j * j for j in range(1, 8)) / 16
CHUNK_BYTES = 64 << 20


def log(msg: str) -> None:
    print(f"[phi3_mini {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class StreamGraph(Graph):
    """Graph whose big initializers can be written to the data file in chunks, and which
    records value_info like the builder (initializers first, then node outputs)."""

    def __init__(self, data_path: Path):
        super().__init__(data_path)
        self.vi_inits: list = []
        self.vi_nodes: list = []

    def init(self, name: str, array: np.ndarray) -> str:
        super().init(name, array)
        self.vi_inits.append(helper.make_tensor_value_info(
            name, helper.np_dtype_to_tensor_dtype(array.dtype), list(array.shape)))
        return name

    def init_stream(self, name: str, dtype, shape, chunks) -> str:
        """Like init(), with the tensor's bytes given as an iterable of arrays (row blocks)."""
        assert name not in self.init_names, name
        self.init_names.add(name)
        dtype = np.dtype(dtype)
        start = self.offset
        for chunk in chunks:
            raw = np.ascontiguousarray(chunk, dtype=dtype.newbyteorder("<")).tobytes()
            self.data.write(raw)
            self.offset += len(raw)
        length = self.offset - start
        assert length == int(np.prod(shape)) * dtype.itemsize, (name, length)
        elem = helper.np_dtype_to_tensor_dtype(dtype)
        t = TensorProto(name=name, data_type=elem, dims=shape, data_location=TensorProto.EXTERNAL)
        for key, value in (("location", self.location), ("offset", str(start)), ("length", str(length))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
        self.inits.append(t)
        self.vi_inits.append(helper.make_tensor_value_info(name, elem, list(shape)))
        return name

    def vi(self, name: str, elem: int, shape) -> None:
        self.vi_nodes.append(helper.make_tensor_value_info(name, elem, list(shape)))


def rng_for(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def q4_chunks(rng: np.random.Generator, n: int, k: int):
    """Random symmetric int4 MatMulNBits blob [n, k/32, 16], in row blocks."""
    rows = max(1, CHUNK_BYTES // (k // 2))
    for r0 in range(0, n, rows):
        r = min(rows, n - r0)
        b = np.frombuffer(rng.bytes(r * (k // 2)), dtype=np.uint8)
        lo, hi = b & 0x0F, b >> 4
        lo[lo == 0] = 8  # no -8: values -7..7, mean 0
        hi[hi == 0] = 8
        yield (lo | (hi << 4)).reshape(r, k // BLOCK, BLOCK // 2)


def q4_scales(rng: np.random.Generator, n: int, k: int, sigma: float) -> np.ndarray:
    base = np.float32(sigma / np.sqrt(NIBBLE_VAR))
    return (base * (np.float32(0.75) + np.float32(0.5) * rng.random((n, k // BLOCK), dtype=np.float32))).astype(np.float32)


def matmul_q4(G: StreamGraph, a, basename: str, inp: str, out: str, n: int, k: int, sigma: float) -> None:
    """MatMulNBits `<basename>_Q4` with random weight `<name>.weight_Q4` / `.weight_scales`
    (builder naming: /model/layers.0/attn/qkv_proj/MatMul -> model.layers.0.attn.qkv_proj.MatMul)."""
    wname = basename.lstrip("/").replace("/", ".")
    rng = rng_for(a.seed, wname)
    w = G.init_stream(f"{wname}.weight_Q4", np.uint8, [n, k // BLOCK, BLOCK // 2], q4_chunks(rng, n, k))
    s = G.init(f"{wname}.weight_scales", q4_scales(rng, n, k, sigma))
    G.node("MatMulNBits", [inp, w, s], [out], f"{basename}_Q4", MS,
           K=k, N=n, accuracy_level=a.accuracy_level, bits=4, block_size=BLOCK)


def build(a, out: Path) -> onnx.ModelProto:
    H, L, heads, kv_heads, F = (PRESET["hidden_size"], a.layers, PRESET["heads"], PRESET["kv_heads"],
                                PRESET["intermediate_size"])
    D = H // heads
    kvd = kv_heads * D
    sigma = a.init_scale
    G = StreamGraph(out / (PRESET["decoder_filename"] + ".data"))
    F32, I64, I32 = TensorProto.FLOAT, TensorProto.INT64, TensorProto.INT32
    BS = ["batch_size", "sequence_length"]

    inputs = [helper.make_tensor_value_info("input_ids", I64, BS),
              helper.make_tensor_value_info("attention_mask", I64, ["batch_size", "total_sequence_length"])]
    outputs = [helper.make_tensor_value_info("logits", F32, BS + [VOCAB])]
    for kind in ("key", "value"):  # builder order: every layer's key, then every layer's value
        inputs += [helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", F32,
                                                 ["batch_size", kv_heads, "past_sequence_length", "kv_cache_dim"])
                   for i in range(L)]
        outputs += [helper.make_tensor_value_info(f"present.{i}.{kind}", F32,
                                                  ["batch_size", kv_heads, "total_sequence_length", "kv_cache_dim"])
                    for i in range(L)]

    # attention mask -> seqlens_k, total_sequence_length (int32)
    base = "/model/attn_mask_reformat/attn_mask_subgraph"
    one = G.const_i64([1])
    G.vi(one, I64, [])
    G.node("ReduceSum", ["attention_mask", one], [f"{base}/ReduceSum/output_0"], f"{base}/ReduceSum", keepdims=0)
    G.vi(f"{base}/ReduceSum/output_0", I64, ["batch_size"])
    G.node("Sub", [f"{base}/ReduceSum/output_0", one], [f"{base}/Sub/output_0"], f"{base}/Sub")
    G.vi(f"{base}/Sub/output_0", I64, ["batch_size"])
    G.node("Cast", [f"{base}/Sub/output_0"], [f"{base}/Sub/Cast/output_0"], f"{base}/Sub/Cast", to=I32)
    G.vi(f"{base}/Sub/Cast/output_0", I32, ["batch_size"])
    G.node("Shape", ["attention_mask"], [f"{base}/Shape/output_0"], f"{base}/Shape")
    G.vi(f"{base}/Shape/output_0", I64, [2])
    idx1 = G.const_i64(1)
    G.vi(idx1, I64, [])
    G.node("Gather", [f"{base}/Shape/output_0", idx1], [f"{base}/Gather/output_0"], f"{base}/Gather", axis=0)
    G.vi(f"{base}/Gather/output_0", I64, [])
    G.node("Cast", [f"{base}/Gather/output_0"], [f"{base}/Gather/Cast/output_0"], f"{base}/Gather/Cast", to=I32)
    G.vi(f"{base}/Gather/Cast/output_0", I32, [])
    seqlens_k, total_len = f"{base}/Sub/Cast/output_0", f"{base}/Gather/Cast/output_0"

    # data file in the builder's order: embedding, layer-0 input norm, rotary caches, the other
    # norms, then the quantized weights layer by layer, lm_head last
    rng = rng_for(a.seed, "model.embed_tokens.weight")
    rows = CHUNK_BYTES // (4 * H)
    emb = G.init_stream("model.embed_tokens.weight", np.float32, [VOCAB, H],
                        (rng.standard_normal((min(rows, VOCAB - r0), H), dtype=np.float32) * np.float32(sigma)
                         for r0 in range(0, VOCAB, rows)))
    ones = np.ones(H, dtype=np.float32)
    G.init("model.layers.0.input_layernorm.weight", ones)
    angle = np.outer(np.arange(CONTEXT, dtype=np.float32), hf_inv_freq(THETA, D))  # float32 products
    G.init("cos_cache", np.cos(angle.astype(np.float64)).astype(np.float32))
    G.init("sin_cache", np.sin(angle.astype(np.float64)).astype(np.float32))
    for i in range(L):
        if i:
            G.init(f"model.layers.{i}.input_layernorm.weight", ones)
        G.init(f"model.layers.{i}.post_attention_layernorm.weight", ones)
    G.init(f"model.layers.{L}.final_norm_layernorm.weight", ones)

    hidden = "/model/embed_tokens/Gather/output_0"
    G.node("Gather", [emb, "input_ids"], [hidden], "/model/embed_tokens/Gather")
    G.vi(hidden, F32, BS + [H])
    skip = None
    t0 = time.time()
    for i in range(L):
        lay = f"/model/layers.{i}"
        x = f"{lay}/input_layernorm/output_0"
        if i == 0:
            G.node("SimplifiedLayerNormalization", [hidden, "model.layers.0.input_layernorm.weight"], [x],
                   f"{lay}/input_layernorm/LayerNorm", epsilon=EPS, axis=-1, stash_type=1)
            G.vi(x, F32, BS + [H])
        else:
            G.node("SkipSimplifiedLayerNormalization", [hidden, skip, f"model.layers.{i}.input_layernorm.weight"],
                   [x, "", "", f"{lay}/input_layernorm/output_3"], f"{lay}/input_layernorm/SkipLayerNorm", MS,
                   epsilon=EPS)
            hidden = f"{lay}/input_layernorm/output_3"
            G.vi(x, F32, BS + [H])
            G.vi(hidden, F32, BS + [H])

        qkv = f"{lay}/attn/qkv_proj/MatMul/output_0"
        matmul_q4(G, a, f"{lay}/attn/qkv_proj/MatMul", x, qkv, H + 2 * kvd, H, sigma)
        G.vi(qkv, F32, BS + [H + 2 * kvd])
        attn = f"{lay}/attn/GroupQueryAttention"
        G.node("GroupQueryAttention",
               [qkv, "", "", f"past_key_values.{i}.key", f"past_key_values.{i}.value", seqlens_k, total_len,
                "cos_cache", "sin_cache", "", "", ""],
               [f"{attn}/output_0", f"present.{i}.key", f"present.{i}.value"], attn, MS,
               num_heads=heads, kv_num_heads=kv_heads, scale=float(1 / np.sqrt(D)), local_window_size=-1,
               softcap=0.0, do_rotary=1, rotary_interleaved=0)
        G.vi(f"{attn}/output_0", F32, BS + [H])
        o = f"{lay}/attn/o_proj/MatMul/output_0"
        matmul_q4(G, a, f"{lay}/attn/o_proj/MatMul", f"{attn}/output_0", o, H, H, sigma)
        G.vi(o, F32, BS + [H])

        x = f"{lay}/post_attention_layernorm/output_0"
        G.node("SkipSimplifiedLayerNormalization", [hidden, o, f"model.layers.{i}.post_attention_layernorm.weight"],
               [x, "", "", f"{lay}/post_attention_layernorm/output_3"],
               f"{lay}/post_attention_layernorm/SkipLayerNorm", MS, epsilon=EPS)
        hidden = f"{lay}/post_attention_layernorm/output_3"
        G.vi(x, F32, BS + [H])
        G.vi(hidden, F32, BS + [H])

        mlp = f"{lay}/mlp"
        gate, up = f"{mlp}/gate_proj/MatMul/output_0", f"{mlp}/up_proj/MatMul/output_0"
        matmul_q4(G, a, f"{mlp}/gate_proj/MatMul", x, gate, F, H, sigma)
        G.vi(gate, F32, BS + [F])
        matmul_q4(G, a, f"{mlp}/up_proj/MatMul", x, up, F, H, sigma)
        G.vi(up, F32, BS + [F])
        G.node("Sigmoid", [gate], [f"{mlp}/act_fn/Sigmoid/output_0"], f"{mlp}/act_fn/Sigmoid")
        G.vi(f"{mlp}/act_fn/Sigmoid/output_0", F32, BS + [F])
        G.node("Mul", [gate, f"{mlp}/act_fn/Sigmoid/output_0"], [f"{mlp}/act_fn/Mul/output_0"], f"{mlp}/act_fn/Mul")
        G.vi(f"{mlp}/act_fn/Mul/output_0", F32, BS + [F])
        G.node("Mul", [f"{mlp}/act_fn/Mul/output_0", up], [f"{mlp}/Mul/output_0"], f"{mlp}/Mul")
        G.vi(f"{mlp}/Mul/output_0", F32, BS + [F])
        skip = f"{mlp}/down_proj/MatMul/output_0"
        matmul_q4(G, a, f"{mlp}/down_proj/MatMul", f"{mlp}/Mul/output_0", skip, H, F, sigma)
        G.vi(skip, F32, BS + [H])
        if i % 8 == 7 or i == L - 1:
            log(f"  layer {i + 1}/{L} written ({G.offset / 1e9:.2f} GB, {time.time() - t0:.1f} s, "
                f"peak RSS {peak_rss_mb():.0f} MB)")

    x = f"/model/layers.{L}/final_norm_layernorm/output_0"
    G.node("SkipSimplifiedLayerNormalization", [hidden, skip, f"model.layers.{L}.final_norm_layernorm.weight"], [x],
           f"/model/layers.{L}/final_norm_layernorm/SkipLayerNorm", MS, epsilon=EPS)
    G.vi(x, F32, BS + [H])
    matmul_q4(G, a, "/lm_head/MatMul", x, "logits", VOCAB, H, sigma * a.lm_head_scale)
    G.close()

    graph = helper.make_graph(G.nodes, "main_graph", inputs, outputs, G.inits,
                              value_info=G.vi_inits + G.vi_nodes)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 22), helper.make_opsetid(MS, 1)],
                             ir_version=10, producer_name="edgeflow tests/gen/phi3_mini.py")


def write_config(a, out: Path) -> None:
    """genai_config.json of the builder, taken from the tiny fixture with Phi-3-mini's shape."""
    cfg = json.loads(CONFIG_TEMPLATE.read_text())
    dec = cfg["model"]["decoder"]
    assert cfg["model"]["type"] == "phi3" and cfg["model"]["context_length"] == CONTEXT
    assert cfg["search"]["past_present_share_buffer"] is True
    dec.update(filename=PRESET["decoder_filename"], head_size=PRESET["hidden_size"] // PRESET["heads"],
               hidden_size=PRESET["hidden_size"], num_attention_heads=PRESET["heads"], num_hidden_layers=a.layers,
               num_key_value_heads=PRESET["kv_heads"])
    cfg["model"]["vocab_size"] = VOCAB
    (out / "genai_config.json").write_text(json.dumps(cfg, indent=4) + "\n")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--out", type=Path, default=PRESET["out"], help=f"output folder (default {PRESET['out']})")
    p.add_argument("--seed", type=int, default=PRESET["seed"], help="weight seed (default %(default)s)")
    p.add_argument("--layers", type=int, default=PRESET["layers"],
                   help="decoder layers (default %(default)s; fewer only for quick tests)")
    p.add_argument("--init-scale", type=float, default=PRESET["init_scale"],
                   help="standard deviation of the weights and the embedding (default %(default)s)")
    p.add_argument("--lm-head-scale", type=float, default=PRESET["lm_head_scale"],
                   help="lm_head weights' extra factor (default %(default)s)")
    p.add_argument("--accuracy-level", type=int, default=PRESET["accuracy_level"], choices=[0, 1, 2, 3, 4],
                   help="MatMulNBits accuracy_level: 4 int8 activations (default, the builder's CPU int4), 1 fp32")
    a = p.parse_args()

    t0 = time.time()
    out = a.out.resolve()
    tmp = out.with_name(f".{out.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    log(f"Phi-3-mini shape: hidden {PRESET['hidden_size']}, {a.layers} layers, heads {PRESET['heads']}/"
        f"{PRESET['kv_heads']}, intermediate {PRESET['intermediate_size']}, vocab {VOCAB}; int4 block {BLOCK}, "
        f"accuracy_level {a.accuracy_level}, seed {a.seed}, init scale {a.init_scale}, lm_head x{a.lm_head_scale}")
    model = build(a, tmp)
    (tmp / PRESET["decoder_filename"]).write_bytes(model.SerializeToString())
    log(f"graph: {len(model.graph.node)} nodes, {len(model.graph.initializer)} initializers")
    del model
    write_config(a, tmp)
    for name in TOKENIZER_FILES:
        shutil.copy2(TOKENIZER_DIR / name, tmp / name)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)

    total = 0
    for f in sorted(out.iterdir()):
        total += f.stat().st_size
        log(f"  {f.name:64s} {f.stat().st_size:>14,d}")
    log(f"wrote {out}: {total:,d} bytes ({total / 1e9:.2f} GB) in {time.time() - t0:.1f} s wall, "
        f"peak RSS {peak_rss_mb():.0f} MB")


if __name__ == "__main__":
    main()
