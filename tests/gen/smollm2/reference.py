#!/usr/bin/env python3
"""Independent numpy reference for the SmolLM2 GGUF: a plain Llama forward pass.

The weights are de-quantized with the `gguf` package's own `gguf.quants.dequantize`
(not with export.py's repacking), attn_q/attn_k rows are put back in Hugging Face order,
and the forward pass is the standard Hugging Face LlamaForCausalLM math: RMSNorm, RoPE with
`rotate_half`, grouped-query attention with a causal mask, SiLU-gated MLP, tied lm_head.
Greedy decoding keeps a key/value cache.  Computation is float32 (`--dtype float64` for a
double-precision run).

Prompts are tokenized with the `tokenizers` package on the exported tokenizer.json; chat
prompts are rendered with the GGUF's ChatML template (`render_chat`, checked against the
template with jinja2 when jinja2 is installed).

Usage:
    python tests/gen/smollm2/reference.py GGUF MODEL_DIR "What is the capital of France?"
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def render_chat(messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The GGUF's chat template (ChatML; a default system turn when the first message is
    not a system message)."""
    out = []
    for i, m in enumerate(messages):
        if i == 0 and messages[0]["role"] != "system":
            out.append(f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n")
        out.append(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n")
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
    return "".join(out)


def check_template(template: str, conversations: list[list[dict]]) -> bool | None:
    """True when render_chat equals the jinja2 rendering of `template` for every
    conversation; None when jinja2 is not installed."""
    try:
        import jinja2
    except ImportError:
        return None
    t = jinja2.Environment().from_string(template)
    return all(t.render(messages=c, add_generation_prompt=True) == render_chat(c) for c in conversations)


class Llama:
    def __init__(self, gguf_path: Path, dtype=np.float32):
        from gguf import GGUFReader
        from gguf.quants import dequantize

        r = GGUFReader(str(gguf_path))
        meta = lambda k, d=None: r.fields[k].contents() if k in r.fields else d
        assert meta("general.architecture") == "llama"
        self.dtype = dtype
        self.n_layers = int(meta("llama.block_count"))
        self.hidden = int(meta("llama.embedding_length"))
        self.n_heads = int(meta("llama.attention.head_count"))
        self.n_kv = int(meta("llama.attention.head_count_kv"))
        self.head_dim = self.hidden // self.n_heads
        self.eps = float(meta("llama.attention.layer_norm_rms_epsilon"))
        self.theta = float(meta("llama.rope.freq_base", 10000.0))
        self.chat_template = meta("tokenizer.chat_template")
        tensors = {t.name: t for t in r.tensors}

        def w(name):
            t = tensors[name]
            a = dequantize(np.asarray(t.data), t.tensor_type)
            return np.ascontiguousarray(a.reshape([int(x) for x in reversed(t.shape)]), dtype=dtype)

        def unpermute(a, heads):  # llama.cpp permute() inverse: GGUF row (h, i, j) = HF row (h, j, i)
            return a.reshape(heads, a.shape[0] // heads // 2, 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)

        self.embed = w("token_embd.weight")  # [vocab, hidden], also the lm_head (tied)
        self.norm = w("output_norm.weight")
        self.layers = []
        for i in range(self.n_layers):
            b = f"blk.{i}."
            self.layers.append(dict(
                attn_norm=w(b + "attn_norm.weight"),
                wq=unpermute(w(b + "attn_q.weight"), self.n_heads).T.copy(),
                wk=unpermute(w(b + "attn_k.weight"), self.n_kv).T.copy(),
                wv=w(b + "attn_v.weight").T.copy(),
                wo=w(b + "attn_output.weight").T.copy(),
                ffn_norm=w(b + "ffn_norm.weight"),
                w_gate=w(b + "ffn_gate.weight").T.copy(),
                w_up=w(b + "ffn_up.weight").T.copy(),
                w_down=w(b + "ffn_down.weight").T.copy(),
            ))
        # HF LlamaRotaryEmbedding (rope_type default): inv_freq = 1 / theta^(2i/d)
        # float32 like torch: x = (2i)/d, p = theta**x rounded to float32, inv_freq = 1/p in float32
        x = np.arange(0, self.head_dim, 2).astype(np.float32) / np.float32(self.head_dim)
        self.inv_freq = np.float32(1.0) / (np.float64(self.theta) ** x.astype(np.float64)).astype(np.float32)

    def rms_norm(self, x, weight):
        var = np.mean(np.square(x), axis=-1, keepdims=True)
        return (x / np.sqrt(var + self.eps)).astype(self.dtype) * weight

    @staticmethod
    def rotate_half(x):
        h = x.shape[-1] // 2
        return np.concatenate([-x[..., h:], x[..., :h]], axis=-1)

    def forward(self, ids: list[int], cache: list | None, pos0: int):
        """ids: new tokens at positions pos0.. -> logits [len(ids), vocab], updated cache."""
        T = len(ids)
        x = self.embed[np.asarray(ids)]
        # HF: the angle position * inv_freq is a float32 product
        freqs = np.outer(np.arange(pos0, pos0 + T, dtype=np.float32), self.inv_freq).astype(np.float64)
        emb = np.concatenate([freqs, freqs], axis=-1)
        cos, sin = np.cos(emb).astype(self.dtype), np.sin(emb).astype(self.dtype)  # [T, head_dim]
        group = self.n_heads // self.n_kv
        new_cache = []
        for li, L in enumerate(self.layers):
            h = self.rms_norm(x, L["attn_norm"])
            q = (h @ L["wq"]).reshape(T, self.n_heads, self.head_dim).transpose(1, 0, 2)
            k = (h @ L["wk"]).reshape(T, self.n_kv, self.head_dim).transpose(1, 0, 2)
            v = (h @ L["wv"]).reshape(T, self.n_kv, self.head_dim).transpose(1, 0, 2)
            q = q * cos + self.rotate_half(q) * sin
            k = k * cos + self.rotate_half(k) * sin
            if cache is not None:
                k = np.concatenate([cache[li][0], k], axis=1)
                v = np.concatenate([cache[li][1], v], axis=1)
            new_cache.append((k, v))
            S = k.shape[1]
            kk = np.repeat(k, group, axis=0)
            vv = np.repeat(v, group, axis=0)
            scores = (q @ kk.transpose(0, 2, 1)) / np.sqrt(self.head_dim).astype(self.dtype)  # [H, T, S]
            causal = np.arange(S)[None, :] > (np.arange(T)[:, None] + pos0)
            scores = np.where(causal[None], -np.inf, scores)
            scores = scores - scores.max(axis=-1, keepdims=True)
            p = np.exp(scores)
            p = p / p.sum(axis=-1, keepdims=True)
            attn = (p @ vv).transpose(1, 0, 2).reshape(T, self.hidden)
            x = x + attn @ L["wo"]
            h = self.rms_norm(x, L["ffn_norm"])
            g = h @ L["w_gate"]
            mlp = (g / (1 + np.exp(-g))) * (h @ L["w_up"])
            x = x + mlp @ L["w_down"]
        x = self.rms_norm(x, self.norm)
        return x @ self.embed.T, new_cache

    def greedy(self, ids: list[int], max_new: int, eos: set[int]) -> tuple[list[int], list[np.ndarray]]:
        """Greedy continuation of `ids`: up to max_new tokens, stopping after an eos id.
        Returns the new ids and the logits each was chosen from."""
        logits, cache = self.forward(ids, None, 0)
        last = logits[-1]
        out, steps = [], []
        pos = len(ids)
        while len(out) < max_new:
            tok = int(np.argmax(last))
            out.append(tok)
            steps.append(last)
            if tok in eos:
                break
            logits, cache = self.forward([tok], cache, pos)
            pos += 1
            last = logits[-1]
        return out, steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("gguf", type=Path)
    p.add_argument("model_dir", type=Path, help="exported folder (for tokenizer.json)")
    p.add_argument("prompt", help="user message (rendered with the chat template) or, with --raw, plain text")
    p.add_argument("--raw", action="store_true")
    p.add_argument("--max-new", type=int, default=48)
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    a = p.parse_args()
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(a.model_dir / "tokenizer.json"))
    t0 = time.time()
    model = Llama(a.gguf, np.dtype(a.dtype).type)
    text = a.prompt if a.raw else render_chat([{"role": "user", "content": a.prompt}])
    ok = check_template(model.chat_template, [[{"role": "user", "content": a.prompt}]])
    if ok is False:
        sys.exit("render_chat differs from the GGUF's chat_template")
    ids = tok.encode(text, add_special_tokens=True).ids
    t1 = time.time()
    out, _ = model.greedy(ids, a.max_new, {0, 2})
    t2 = time.time()
    print(f"prompt ({len(ids)} tokens): {text!r}")
    print(f"tokens: {out}")
    print(f"answer: {tok.decode(out, skip_special_tokens=False)!r}")
    print(f"load {t1 - t0:.1f} s, {len(out)} tokens in {t2 - t1:.1f} s")


if __name__ == "__main__":
    main()
