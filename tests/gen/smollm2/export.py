#!/usr/bin/env python3
"""SmolLM2-135M-Instruct GGUF (Q4_1) -> ONNX Runtime GenAI model folder, without torch.

Reads a llama.cpp GGUF file with the `gguf` package and writes, with `numpy` + `onnx` only
(+ `tokenizers` for tokenizer.json):

    model.onnx  model.onnx.data  genai_config.json
    tokenizer.json  tokenizer_config.json  special_tokens_map.json

The graph follows what onnxruntime-genai 0.18.0's model builder writes for a Llama model
on CPU with int4 weights (`builder -p int4 -e cpu`), node and initializer names included:
`input_ids`, `attention_mask`, `past_key_values.N.key/value` -> `logits`,
`present.N.key/value`; SimplifiedLayerNormalization / SkipSimplifiedLayerNormalization;
one packed q|k|v MatMulNBits per layer feeding com.microsoft.GroupQueryAttention
(seqlens_k = ReduceSum(attention_mask) - 1 and total_sequence_length =
Shape(attention_mask)[1], both int32; do_rotary=1 with cos_cache/sin_cache initializers for
the whole 8192-token context, theta from the GGUF); MatMulNBits o/gate/up/down projections;
SiLU as Sigmoid + Mul; the tied embedding read with GatherBlockQuantized from the lm_head's
own initializers.

The GGUF's quantized values are kept; nothing is re-quantized.  Where the builder's layout
cannot hold them exactly, small exact additions are made:

* Q4_1 (blocks of 32 along the input dimension, w = d*q + m, q in 0..15) becomes the
  builder's symmetric 4-bit MatMulNBits (no zero_points input, implicit zero point 8, scale
  d; nibbles repacked from ggml's order, element j / j+16 in byte j, to MatMulNBits', element
  2i / 2i+1 in byte i) plus an exact correction for the block minimum:
  d*q + m = d*(q - 8) + (m + 8d), so

      y = MatMulNBits(x; q, d) + BlockSum32(x) @ (m + 8d)^T

  (`<proj>/min/MatMul` + `<proj>/min/Add`; BlockSum32 = Reshape + ReduceSum over each block
  of 32 inputs, computed once per input tensor; the [K/32, N] fp32 offsets are ~3% of the
  4-bit weights' size).  Float zero points (zp = -m/d, `--zero-points float`) are accepted
  by onnxruntime 1.32's CPU MatMulNBits, but then the kernel skips prepacking and
  de-quantizes the whole weight to fp32 on every call (`ComputeBUnpacked`), whatever the
  accuracy_level: ~9 tokens/s instead of ~87.  uint8 zero points only hold integers, and
  m/d is not one.
* accuracy_level 1 (fp32 activations; 0 is the same on CPU).  4 (int8 activations, the
  builder's CPU default) decodes ~1.7x faster, but its rounding flips close greedy choices of
  this small model (the reference's first answer token to "What is the capital of France?"
  wins by 0.08 logits) and only 15/20 prompts of quality.py keep their first 16 tokens;
  with 1 the logits are within 2e-4 of the fp32 reference and 20/20 do.
* Q8_0 token_embd (tied: there is no output.weight; w = d*q, q int8) is stored as two 4-bit
  halves of u = q + 128 = 16*hi + lo, so d*q = 16d*(hi - 8) + d*(lo - 0): the lm_head is two
  4-bit MatMulNBits (the `lo` one with explicit zero points 0) + Add, and the embedding is
  two GatherBlockQuantized (bits=4) over the same initializers + Add.  Exact, and fast at
  accuracy_level 1.  An 8-bit MatMulNBits (`--lm-head q8`, the builder's tied 8-bit layout)
  is exact too, but onnxruntime 1.32's CPU kernel has no fp32-activation 8-bit path and falls
  back to de-quantizing the 28M-weight table on every call (~9 tokens/s at accuracy_level 1;
  fine at 4).  `--lm-head fp32` writes an fp32 MatMul (same speed, +100 MB).
* llama.cpp's converter permutes the rows of attn_q/attn_k for its interleaved RoPE; the
  rows are put back in Hugging Face order (whole quantized rows move; the blocks run along
  the other dimension), so GroupQueryAttention uses the builder's rotary_interleaved=0.
  `--keep-rope-permutation` keeps llama.cpp's order with rotary_interleaved=1 instead: same
  logits up to rounding.

Every run on the same GGUF writes byte-identical files.

Usage:
    python tests/gen/smollm2/export.py GGUF OUT_DIR

Options for comparisons: --accuracy-level, --zero-points float, --lm-head q8|fp32,
--keep-rope-permutation, and --requantize-rtn (de-quantize every weight and re-quantize it
the way the builder does: onnxruntime's symmetric RTN int4, block 32, lm_head included).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

GGML_F32, GGML_Q4_1, GGML_Q8_0 = 0, 3, 8
BLOCK = 32
MS = "com.microsoft"


def log(msg: str) -> None:
    print(f"[export {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------
# GGUF
# ---------------------------------------------------------------------------
class Gguf:
    def __init__(self, path: Path):
        from gguf import GGUFReader

        self.reader = GGUFReader(str(path))
        self.tensors = {t.name: t for t in self.reader.tensors}

    def meta(self, key: str, default=None):
        field = self.reader.fields.get(key)
        if field is None:
            return default
        return field.contents()

    def raw(self, name: str, ggml_type: int) -> np.ndarray:
        t = self.tensors[name]
        if int(t.tensor_type) != ggml_type:
            sys.exit(f"{name}: GGML type {t.tensor_type.name}, expected {ggml_type}")
        return np.asarray(t.data)

    def f32(self, name: str) -> np.ndarray:
        return np.array(self.raw(name, GGML_F32), dtype=np.float32).reshape(-1)

    def q4_1(self, name: str, n: int, k: int):
        """-> d [n, k/32] f32, m [n, k/32] f32, q [n, k/32, 32] uint8 (element order)."""
        b = self.raw(name, GGML_Q4_1).reshape(n, k // BLOCK, 20)
        d = b[..., 0:2].copy().view("<f2")[..., 0].astype(np.float32)
        m = b[..., 2:4].copy().view("<f2")[..., 0].astype(np.float32)
        qs = b[..., 4:20]
        # ggml: qs[j] low nibble = element j, high nibble = element j + 16
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)
        return d, m, q

    def q8_0(self, name: str, n: int, k: int):
        """-> d [n, k/32] f32, q [n, k/32, 32] int8."""
        b = self.raw(name, GGML_Q8_0).reshape(n, k // BLOCK, 34)
        d = b[..., 0:2].copy().view("<f2")[..., 0].astype(np.float32)
        q = b[..., 2:34].copy().view(np.int8)
        return d, q


def pack4(q: np.ndarray) -> np.ndarray:
    """[n, blocks, 32] values 0..15 -> MatMulNBits blob [n, blocks, 16]: element 2i in the
    low nibble of byte i, element 2i+1 in the high nibble."""
    q = q.astype(np.uint8)
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def unpermute_rows(a: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's `permute` of attn_q/attn_k rows (convert_hf_to_gguf.py): GGUF row
    (head, i, j) is Hugging Face row (head, j, i), i < head_dim/2, j < 2."""
    rows = a.shape[0]
    return a.reshape(n_head, rows // n_head // 2, 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)


# ---------------------------------------------------------------------------
# Graph assembly (builder naming)
# ---------------------------------------------------------------------------
class Graph:
    """Nodes plus initializers; each initializer's bytes go straight to the external-data
    file (one file, in creation order, like onnx's own external-data writer), so only one
    layer's arrays are in memory at a time."""

    def __init__(self, data_path: Path):
        self.nodes: list = []
        self.inits: list = []
        self.init_names: set = set()
        self.consts: set = set()
        self.location = data_path.name
        self.data = open(data_path, "wb")
        self.offset = 0

    def init(self, name: str, array: np.ndarray) -> str:
        assert name not in self.init_names, name
        self.init_names.add(name)
        a = np.ascontiguousarray(array)
        raw = a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()
        t = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(a.dtype), dims=a.shape,
                        data_location=TensorProto.EXTERNAL)
        for key, value in (("location", self.location), ("offset", str(self.offset)), ("length", str(len(raw)))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
        self.data.write(raw)
        self.offset += len(raw)
        self.inits.append(t)
        return name

    def close(self) -> None:
        self.data.close()

    def node(self, op, inputs, outputs, name, domain="", **attrs):
        self.nodes.append(helper.make_node(op, list(inputs), list(outputs), name=name, domain=domain, **attrs))

    def const_i64(self, value) -> str:
        """The builder's shared constants: Constant node `/model/constant_nodes/INT64/<v>`
        with output `/model/constants/INT64/<v>`."""
        key = str(value)
        out = f"/model/constants/INT64/{key}"
        if key not in self.consts:
            self.consts.add(key)
            arr = np.array(value, dtype=np.int64)
            self.node("Constant", [], [out], f"/model/constant_nodes/INT64/{key}",
                      value=numpy_helper.from_array(arr, ""))
        return out


class Exporter:
    def __init__(self, g: Gguf, a):
        self.g, self.a = g, a
        arch = g.meta("general.architecture")
        if arch != "llama":
            sys.exit(f"general.architecture is {arch!r}, expected 'llama'")
        self.layers = int(g.meta("llama.block_count"))
        self.hidden = int(g.meta("llama.embedding_length"))
        self.ffn = int(g.meta("llama.feed_forward_length"))
        self.heads = int(g.meta("llama.attention.head_count"))
        self.kv_heads = int(g.meta("llama.attention.head_count_kv"))
        self.head_dim = self.hidden // self.heads
        self.rope_dim = int(g.meta("llama.rope.dimension_count", self.head_dim))
        self.theta = float(g.meta("llama.rope.freq_base", 10000.0))
        self.eps = float(g.meta("llama.attention.layer_norm_rms_epsilon"))
        self.context = int(g.meta("llama.context_length"))
        self.tokens = list(g.meta("tokenizer.ggml.tokens"))
        self.vocab = int(g.meta("llama.vocab_size", len(self.tokens)))
        if self.rope_dim != self.head_dim or g.meta("llama.rope.scaling.type") not in (None, "none"):
            sys.exit("only plain full-dimension RoPE is supported")
        if "output.weight" in g.tensors:
            sys.exit("this exporter handles tied embeddings only (the GGUF has output.weight)")
        self.G = Graph(a.out / "model.onnx.data")
        self.block_sums: dict[str, str] = {}

    # -- weights ------------------------------------------------------------
    def q4_weight(self, tensor: str, n: int, k: int, permute_heads: int = 0):
        d, m, q = self.g.q4_1(tensor, n, k)
        if permute_heads and not self.a.keep_rope_permutation:
            d, m, q = (unpermute_rows(x, permute_heads) for x in (d, m, q))
        return d, m, q

    def matmul_q4(self, parts, basename: str, inp: str, out: str) -> None:
        """One MatMulNBits (+ block-minimum correction) for the concatenation along N of
        `parts` = [(d, m, q), ...]."""
        d = np.concatenate([p[0] for p in parts])
        m = np.concatenate([p[1] for p in parts])
        q = np.concatenate([p[2] for p in parts])
        n, nb = d.shape
        k = nb * BLOCK
        G = self.G
        wname = basename[1:].replace("/", ".")  # /model/layers.0/attn/qkv_proj/MatMul -> model.layers.0...
        attrs = dict(K=k, N=n, accuracy_level=self.a.accuracy_level, bits=4, block_size=BLOCK)

        if self.a.requantize_rtn:
            w = d[..., None] * q.astype(np.float32) + m[..., None]  # [n, nb, 32]
            packed, scales = rtn_int4(w.reshape(n, k))
            G.init(f"{wname}.weight_Q4", packed)
            G.init(f"{wname}.weight_scales", scales)
            G.node("MatMulNBits", [inp, f"{wname}.weight_Q4", f"{wname}.weight_scales"], [out],
                   f"{basename}_Q4", MS, **attrs)
            return

        if self.a.zero_points == "float":
            safe = d != 0
            scale = np.where(safe, d, m)  # d == 0: every weight of the block is m = m * (1 - 0)
            zp = np.where(safe, -m / np.where(safe, d, 1), 0).astype(np.float32)
            q = np.where(safe[..., None], q, 1).astype(np.uint8)
            G.init(f"{wname}.weight_Q4", pack4(q))
            G.init(f"{wname}.weight_scales", scale.astype(np.float32))
            G.init(f"{wname}.weight_zp", zp)
            G.node("MatMulNBits", [inp, f"{wname}.weight_Q4", f"{wname}.weight_scales", f"{wname}.weight_zp"],
                   [out], f"{basename}_Q4", MS, **attrs)
            return

        # fold: symmetric int4 (implicit zero point 8) + (m + 8d) * block sums of x
        offset = (m.astype(np.float64) + 8.0 * d.astype(np.float64)).astype(np.float32)  # [n, nb]
        G.init(f"{wname}.weight_Q4", pack4(q))
        G.init(f"{wname}.weight_scales", d.astype(np.float32))
        main = f"{basename}_Q4/output_0"
        G.node("MatMulNBits", [inp, f"{wname}.weight_Q4", f"{wname}.weight_scales"], [main],
               f"{basename}_Q4", MS, **attrs)
        proj = basename.rsplit("/", 1)[0]  # /model/layers.0/attn/qkv_proj
        bsum = self.block_sum(inp, k)
        G.init(f"{wname}.weight_offsets", np.ascontiguousarray(offset.T))  # [nb, n]
        corr = f"{proj}/min/MatMul/output_0"
        G.node("MatMul", [bsum, f"{wname}.weight_offsets"], [corr], f"{proj}/min/MatMul")
        G.node("Add", [main, corr], [out], f"{proj}/min/Add")

    def block_sum(self, inp: str, k: int) -> str:
        """Sum of x over each block of 32 inputs: [B, S, K] -> [B, S, K/32] (one per input)."""
        if inp in self.block_sums:
            return self.block_sums[inp]
        base = inp.rsplit("/", 1)[0] + "/block_sum"
        G = self.G
        G.node("Reshape", [inp, G.const_i64([0, 0, k // BLOCK, BLOCK])], [f"{base}/Reshape/output_0"],
               f"{base}/Reshape")
        G.node("ReduceSum", [f"{base}/Reshape/output_0", G.const_i64([-1])], [f"{base}/ReduceSum/output_0"],
               f"{base}/ReduceSum", keepdims=0)
        self.block_sums[inp] = f"{base}/ReduceSum/output_0"
        return self.block_sums[inp]

    # -- graph ----------------------------------------------------------------
    def build(self) -> onnx.ModelProto:
        G, L = self.G, self.layers
        kvd = self.kv_heads * self.head_dim
        inputs = [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]),
        ]
        outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", self.vocab])]
        kv_in = ["batch_size", self.kv_heads, "past_sequence_length", "kv_cache_dim"]
        kv_out = ["batch_size", self.kv_heads, "total_sequence_length", "kv_cache_dim"]
        for kind in ("key", "value"):
            inputs += [helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", TensorProto.FLOAT, kv_in) for i in range(L)]
        for kind in ("key", "value"):
            outputs += [helper.make_tensor_value_info(f"present.{i}.{kind}", TensorProto.FLOAT, kv_out) for i in range(L)]

        # attention mask -> seqlens_k, total_sequence_length
        base = "/model/attn_mask_reformat/attn_mask_subgraph"
        one = G.const_i64([1])
        G.node("ReduceSum", ["attention_mask", one], [f"{base}/ReduceSum/output_0"], f"{base}/ReduceSum", keepdims=0)
        G.node("Sub", [f"{base}/ReduceSum/output_0", one], [f"{base}/Sub/output_0"], f"{base}/Sub")
        G.node("Cast", [f"{base}/Sub/output_0"], [f"{base}/Sub/Cast/output_0"], f"{base}/Sub/Cast", to=TensorProto.INT32)
        G.node("Shape", ["attention_mask"], [f"{base}/Shape/output_0"], f"{base}/Shape")
        G.node("Gather", [f"{base}/Shape/output_0", G.const_i64(1)], [f"{base}/Gather/output_0"], f"{base}/Gather", axis=0)
        G.node("Cast", [f"{base}/Gather/output_0"], [f"{base}/Gather/Cast/output_0"], f"{base}/Gather/Cast", to=TensorProto.INT32)
        seqlens_k, total_len = f"{base}/Sub/Cast/output_0", f"{base}/Gather/Cast/output_0"

        hidden = self.embedding()

        cos, sin = self.rope_caches()
        G.init("cos_cache", cos)
        G.init("sin_cache", sin)

        skip = None  # residual branch feeding the next SkipSimplifiedLayerNormalization
        for i in range(L):
            norm_w = f"model.layers.{i}.input_layernorm.weight"
            G.init(norm_w, self.g.f32(f"blk.{i}.attn_norm.weight"))
            x = f"/model/layers.{i}/input_layernorm/output_0"
            if i == 0:
                G.node("SimplifiedLayerNormalization", [hidden, norm_w], [x], "/model/layers.0/input_layernorm/LayerNorm",
                       epsilon=self.eps, axis=-1, stash_type=1)
            else:
                G.node("SkipSimplifiedLayerNormalization", [hidden, skip, norm_w],
                       [x, "", "", f"/model/layers.{i}/input_layernorm/output_3"],
                       f"/model/layers.{i}/input_layernorm/SkipLayerNorm", MS, epsilon=self.eps)
                hidden = f"/model/layers.{i}/input_layernorm/output_3"

            # attention: packed q|k|v -> GroupQueryAttention -> o_proj
            H = self.hidden
            qkv = [self.q4_weight(f"blk.{i}.attn_q.weight", H, H, permute_heads=self.heads),
                   self.q4_weight(f"blk.{i}.attn_k.weight", kvd, H, permute_heads=self.kv_heads),
                   self.q4_weight(f"blk.{i}.attn_v.weight", kvd, H)]
            qkv_out = f"/model/layers.{i}/attn/qkv_proj/MatMul/output_0"
            self.matmul_q4(qkv, f"/model/layers.{i}/attn/qkv_proj/MatMul", x, qkv_out)
            attn = f"/model/layers.{i}/attn/GroupQueryAttention"
            G.node("GroupQueryAttention",
                   [qkv_out, "", "", f"past_key_values.{i}.key", f"past_key_values.{i}.value", seqlens_k, total_len,
                    "cos_cache", "sin_cache", "", "", ""],
                   [f"{attn}/output_0", f"present.{i}.key", f"present.{i}.value"], attn, MS,
                   num_heads=self.heads, kv_num_heads=self.kv_heads, scale=float(1 / np.sqrt(self.head_dim)),
                   local_window_size=-1, softcap=0.0, do_rotary=1,
                   rotary_interleaved=1 if self.a.keep_rope_permutation else 0)
            o_out = f"/model/layers.{i}/attn/o_proj/MatMul/output_0"
            self.matmul_q4([self.q4_weight(f"blk.{i}.attn_output.weight", H, H)], f"/model/layers.{i}/attn/o_proj/MatMul",
                           f"{attn}/output_0", o_out)

            norm_w = f"model.layers.{i}.post_attention_layernorm.weight"
            G.init(norm_w, self.g.f32(f"blk.{i}.ffn_norm.weight"))
            x = f"/model/layers.{i}/post_attention_layernorm/output_0"
            G.node("SkipSimplifiedLayerNormalization", [hidden, o_out, norm_w],
                   [x, "", "", f"/model/layers.{i}/post_attention_layernorm/output_3"],
                   f"/model/layers.{i}/post_attention_layernorm/SkipLayerNorm", MS, epsilon=self.eps)
            hidden = f"/model/layers.{i}/post_attention_layernorm/output_3"

            # MLP: down(silu(gate(x)) * up(x))
            mlp = f"/model/layers.{i}/mlp"
            F = self.ffn
            self.matmul_q4([self.q4_weight(f"blk.{i}.ffn_gate.weight", F, H)], f"{mlp}/gate_proj/MatMul", x,
                           f"{mlp}/gate_proj/MatMul/output_0")
            self.matmul_q4([self.q4_weight(f"blk.{i}.ffn_up.weight", F, H)], f"{mlp}/up_proj/MatMul", x,
                           f"{mlp}/up_proj/MatMul/output_0")
            G.node("Sigmoid", [f"{mlp}/gate_proj/MatMul/output_0"], [f"{mlp}/act_fn/Sigmoid/output_0"], f"{mlp}/act_fn/Sigmoid")
            G.node("Mul", [f"{mlp}/gate_proj/MatMul/output_0", f"{mlp}/act_fn/Sigmoid/output_0"],
                   [f"{mlp}/act_fn/Mul/output_0"], f"{mlp}/act_fn/Mul")
            G.node("Mul", [f"{mlp}/act_fn/Mul/output_0", f"{mlp}/up_proj/MatMul/output_0"], [f"{mlp}/Mul/output_0"], f"{mlp}/Mul")
            skip = f"{mlp}/down_proj/MatMul/output_0"
            self.matmul_q4([self.q4_weight(f"blk.{i}.ffn_down.weight", H, F)], f"{mlp}/down_proj/MatMul",
                           f"{mlp}/Mul/output_0", skip)

        norm_w = f"model.layers.{L}.final_norm_layernorm.weight"
        G.init(norm_w, self.g.f32("output_norm.weight"))
        x = f"/model/layers.{L}/final_norm_layernorm/output_0"
        G.node("SkipSimplifiedLayerNormalization", [hidden, skip, norm_w], [x],
               f"/model/layers.{L}/final_norm_layernorm/SkipLayerNorm", MS, epsilon=self.eps)

        self.lm_head(x)

        graph = helper.make_graph(G.nodes, "main_graph", inputs, outputs, G.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 22), helper.make_opsetid(MS, 1)],
                                  ir_version=10, producer_name="edgeflow tests/gen/smollm2/export.py")
        return model

    # -- tied embedding / lm_head (Q8_0: w = d*q, q int8) ---------------------------
    def embedding(self) -> str:
        """The embedding lookup; it reads the lm_head's initializers where the layout allows
        (tied weights, as the builder does).  Returns the hidden-state tensor name."""
        G, V, H = self.G, self.vocab, self.hidden
        d, q = self.g.q8_0("token_embd.weight", V, H)
        self.emb_d = d
        self.emb_u8 = q.view(np.uint8) ^ np.uint8(0x80)  # q + 128 as uint8 [V, H/32, 32]
        gbq = dict(block_size=BLOCK, gather_axis=0, quantize_axis=1)
        mode = "rtn" if self.a.requantize_rtn else self.a.lm_head
        if mode == "q4x2":
            # u = q + 128 = 16*hi + lo, two 4-bit halves:  d*q = 16d*(hi - 8) + d*(lo - 0)
            parts = []
            for tag, nibble, scale in (("hi", self.emb_u8 >> 4, 16 * d), ("lo", self.emb_u8 & 0x0F, d)):
                w, s = G.init(f"lm_head.{tag}.MatMul.weight_Q4", pack4(nibble)), G.init(f"lm_head.{tag}.MatMul.weight_scales", scale)
                zp = [G.init("lm_head.lo.MatMul.weight_zp", np.zeros((V, (H // BLOCK + 1) // 2), np.uint8))] if tag == "lo" else []
                base = f"/model/embed_tokens/{tag}"
                G.node("Reshape", [w, G.const_i64([V, H // 2])], [f"{base}/Reshape/output_0"], f"{base}/Reshape")
                G.node("GatherBlockQuantized", [f"{base}/Reshape/output_0", "input_ids", s, *zp],
                       [f"{base}/GatherBlockQuantized/output_0"], f"{base}/GatherBlockQuantized", MS, bits=4, **gbq)
                parts.append(f"{base}/GatherBlockQuantized/output_0")
            G.node("Add", parts, ["/model/embed_tokens/Add/output_0"], "/model/embed_tokens/Add")
            return "/model/embed_tokens/Add/output_0"
        if mode == "q8":  # the builder's tied layout, 8 bits
            w, s, bits = G.init("lm_head.MatMul.weight_Q8", self.emb_u8), G.init("lm_head.MatMul.weight_scales", d), 8
        elif mode == "rtn":  # the builder's tied layout, re-quantized to int4
            packed, scales = rtn_int4((d[..., None] * q.astype(np.float32)).reshape(V, H))
            w, s, bits = G.init("lm_head.MatMul.weight_Q4", packed), G.init("lm_head.MatMul.weight_scales", scales), 4
        else:  # fp32 lm_head: the embedding keeps its own exact 8-bit table
            w, s, bits = G.init("model.embed_tokens.weight_Q8", self.emb_u8), G.init("model.embed_tokens.weight_scales", d), 8
        G.node("Reshape", [w, G.const_i64([V, H * bits // 8])], ["/model/embed_tokens/Reshape/output_0"],
               "/model/embed_tokens/Reshape")
        G.node("GatherBlockQuantized", ["/model/embed_tokens/Reshape/output_0", "input_ids", s],
               ["/model/embed_tokens/GatherBlockQuantized/output_0"], "/model/embed_tokens/GatherBlockQuantized", MS,
               bits=bits, **gbq)
        return "/model/embed_tokens/GatherBlockQuantized/output_0"

    def lm_head(self, x: str) -> None:
        G = self.G
        mm = dict(K=self.hidden, N=self.vocab, accuracy_level=self.a.accuracy_level, block_size=BLOCK)
        mode = "rtn" if self.a.requantize_rtn else self.a.lm_head
        if mode == "q4x2":
            parts = []
            for tag in ("hi", "lo"):
                zp = ["lm_head.lo.MatMul.weight_zp"] if tag == "lo" else []
                out = f"/lm_head/{tag}/MatMul_Q4/output_0"
                G.node("MatMulNBits", [x, f"lm_head.{tag}.MatMul.weight_Q4", f"lm_head.{tag}.MatMul.weight_scales", *zp],
                       [out], f"/lm_head/{tag}/MatMul_Q4", MS, bits=4, **mm)
                parts.append(out)
            G.node("Add", parts, ["logits"], "/lm_head/Add")
        elif mode == "q8":
            G.node("MatMulNBits", [x, "lm_head.MatMul.weight_Q8", "lm_head.MatMul.weight_scales"], ["logits"],
                   "/lm_head/MatMul_Q8", MS, bits=8, **mm)
        elif mode == "rtn":
            G.node("MatMulNBits", [x, "lm_head.MatMul.weight_Q4", "lm_head.MatMul.weight_scales"], ["logits"],
                   "/lm_head/MatMul_Q4", MS, bits=4, **mm)
        else:
            w = self.emb_d[..., None] * (self.emb_u8.astype(np.float32) - 128)
            G.init("lm_head.MatMul.weight", np.ascontiguousarray(w.reshape(self.vocab, self.hidden).T))
            G.node("MatMul", [x, "lm_head.MatMul.weight"], ["logits"], "/lm_head/MatMul")

    def rope_caches(self):
        """cos/sin of position * inv_freq for every position of the context, [context, head_dim/2],
        with Hugging Face's (and the builder's) float32 arithmetic: inv_freq = 1/theta^(2i/d)
        and the angle position * inv_freq rounded to float32, then cos/sin of that angle."""
        inv_freq = hf_inv_freq(self.theta, self.head_dim)
        angle = np.outer(np.arange(self.context, dtype=np.float32), inv_freq)  # float32 products
        return np.cos(angle.astype(np.float64)).astype(np.float32), np.sin(angle.astype(np.float64)).astype(np.float32)


def hf_inv_freq(theta: float, dim: int) -> np.ndarray:
    """RoPE inverse frequencies exactly as Hugging Face / the builder compute them in torch
    float32: x = (2i)/dim, p = theta**x rounded to float32, 1/p in float32."""
    x = np.arange(0, dim, 2).astype(np.float32) / np.float32(dim)
    return np.float32(1.0) / (np.float64(theta) ** x.astype(np.float64)).astype(np.float32)


def rtn_int4(w: np.ndarray):
    """Builder-style symmetric RTN int4, block 32 (onnxruntime's own quantize_matmul_4bits,
    as MatMulNBitsQuantizer's default algorithm uses). w: [N, K] -> packed [N, K/32, 16],
    scales [N, K/32]."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    n, k = w.shape
    wt = np.ascontiguousarray(w.T.astype(np.float32))  # [K, N] as a MatMul weight
    nb = k // BLOCK
    packed = np.zeros((n, nb, BLOCK // 2), dtype=np.uint8)
    scales = np.zeros((n, nb), dtype=np.float32)
    zp = np.zeros((n, (nb + 1) // 2), dtype=np.uint8)
    quantize_matmul_4bits(packed, wt, scales, zp, BLOCK, n, k, True)
    return packed, scales


# ---------------------------------------------------------------------------
# tokenizer + configs
# ---------------------------------------------------------------------------
def write_tokenizer(g: Gguf, out: Path) -> dict:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    model = g.meta("tokenizer.ggml.model")
    pre = g.meta("tokenizer.ggml.pre")
    if model != "gpt2" or pre not in ("smollm",):
        sys.exit(f"tokenizer {model}/{pre}: only the byte-level BPE 'gpt2' model with the 'smollm' pre-tokenizer is handled")
    tokens = list(g.meta("tokenizer.ggml.tokens"))
    types = list(g.meta("tokenizer.ggml.token_type"))
    merges = [tuple(m.split(" ")) for m in g.meta("tokenizer.ggml.merges")]
    vocab = {t: i for i, t in enumerate(tokens)}
    assert len(vocab) == len(tokens), "duplicate tokens"
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    # llama.cpp's "smollm" pre-tokenizer: every digit on its own, then the GPT-2 byte-level split
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    CONTROL = 3  # llama.cpp token type: control (special) token
    special = [tokens[i] for i, t in enumerate(types) if t == CONTROL]
    tok.add_special_tokens([AddedToken(s, single_word=False, lstrip=False, rstrip=False, normalized=False, special=True)
                            for s in special])
    text = tok.to_str(pretty=True)
    check = Tokenizer.from_str(text)
    assert check.get_vocab_size(with_added_tokens=True) == len(tokens)
    (out / "tokenizer.json").write_text(text + "\n", encoding="utf-8")

    name = lambda key: tokens[int(g.meta(key))]
    bos, eos = name("tokenizer.ggml.bos_token_id"), name("tokenizer.ggml.eos_token_id")
    pad = name("tokenizer.ggml.padding_token_id") if g.meta("tokenizer.ggml.padding_token_id") is not None else eos
    unk = name("tokenizer.ggml.unknown_token_id") if g.meta("tokenizer.ggml.unknown_token_id") is not None else None
    added = {str(vocab[s]): {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                             "single_word": False, "special": True} for s in special}
    extra = [s for s in ("<|im_start|>", "<|im_end|>") if s in vocab]
    cfg = {
        "add_bos_token": bool(g.meta("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": extra,
        "bos_token": bos,
        "chat_template": g.meta("tokenizer.chat_template"),
        "clean_up_tokenization_spaces": False,
        "eos_token": eos,
        "model_max_length": int(g.meta("llama.context_length")),
        "pad_token": pad,
        "tokenizer_class": "GPT2Tokenizer",
        "unk_token": unk,
        "vocab_size": len(tokens),
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    smap = {"additional_special_tokens": extra, "bos_token": bos, "eos_token": eos, "pad_token": pad, "unk_token": unk}
    (out / "special_tokens_map.json").write_text(json.dumps(smap, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return vocab


def write_genai_config(e: Exporter, vocab: dict, out: Path, max_length: int) -> None:
    g = e.g
    eos = [vocab[t] for t in ("<|im_end|>", "<|endoftext|>") if t in vocab]
    if int(g.meta("tokenizer.ggml.eos_token_id")) not in eos:
        eos.insert(0, int(g.meta("tokenizer.ggml.eos_token_id")))
    cfg = {
        "model": {
            "bos_token_id": int(g.meta("tokenizer.ggml.bos_token_id")),
            "context_length": e.context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": "model.onnx",
                "head_size": e.head_dim,
                "hidden_size": e.hidden,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": e.heads,
                "num_hidden_layers": e.layers,
                "num_key_value_heads": e.kv_heads,
            },
            "eos_token_id": eos,
            "pad_token_id": int(g.meta("tokenizer.ggml.padding_token_id", eos[0])),
            "type": "llama",
            "vocab_size": e.vocab,
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": min(max_length, e.context),
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": True,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 50,
            "top_p": 1.0,
        },
    }
    (out / "genai_config.json").write_text(json.dumps(cfg, indent=4) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("gguf", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--accuracy-level", type=int, default=1, choices=[0, 1, 2, 3, 4],
                   help="MatMulNBits accuracy_level: 1 fp32 activations (default), 4 int8 activations")
    p.add_argument("--zero-points", choices=["fold", "float"], default="fold",
                   help="Q4_1 layout: fold (symmetric int4 + block-minimum MatMul, default) or float zero points")
    p.add_argument("--lm-head", choices=["q4x2", "q8", "fp32"], default="q4x2",
                   help="tied Q8_0 embedding/lm_head: two 4-bit halves (default), 8-bit MatMulNBits, or fp32 MatMul")
    p.add_argument("--requantize-rtn", action="store_true",
                   help="comparison only: re-quantize the de-quantized weights like the builder (symmetric RTN int4)")
    p.add_argument("--keep-rope-permutation", action="store_true",
                   help="keep llama.cpp's q/k row order and use rotary_interleaved=1")
    p.add_argument("--max-length", type=int, default=2048, help="genai_config.json search.max_length")
    a = p.parse_args()

    t0 = time.time()
    a.out.mkdir(parents=True, exist_ok=True)
    g = Gguf(a.gguf)
    e = Exporter(g, a)
    log(f"{a.gguf.name}: llama, {e.layers} layers, hidden {e.hidden}, ffn {e.ffn}, heads {e.heads}/{e.kv_heads}, "
        f"vocab {e.vocab}, context {e.context}, rope theta {e.theta:g}")
    model = e.build()
    log(f"graph: {len(model.graph.node)} nodes, {len(model.graph.initializer)} initializers "
        f"(zero points: {'rtn re-quantized' if a.requantize_rtn else a.zero_points}, accuracy_level {a.accuracy_level}, "
        f"lm_head {a.lm_head}, rotary_interleaved {int(a.keep_rope_permutation)})")
    e.G.close()
    (a.out / "model.onnx").write_bytes(model.SerializeToString())
    del model, e.G
    vocab = write_tokenizer(g, a.out)
    write_genai_config(e, vocab, a.out, a.max_length)
    total = 0
    for f in sorted(a.out.iterdir()):
        total += f.stat().st_size
        log(f"  {f.name:28s} {f.stat().st_size:>12,d}")
    log(f"wrote {a.out} ({total / 1e6:.1f} MB) in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
