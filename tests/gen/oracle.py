#!/usr/bin/env python3
"""Correctness oracle: greedy onnxruntime-genai runs over the fixture models.

For every model folder under tests/fixtures/models/ (or the folders given),
runs onnxruntime-genai (Python API, 0.18.0) greedily on a fixed set of prompts
and writes tests/fixtures/oracle/<folder-name>.json:

    {model, genai_version, onnxruntime_version, max_new_tokens, eos_token_ids,
     min_margin,
     cases: [{name, kind: "chat"|"raw", text, messages (chat only),
              prompt_token_ids, token_ids, text_out, finish_reason,
              min_margin, steps: [{token_id, top: [[id, logit] x5]}]}]}

Prompts are tokenized with the Hugging Face `tokenizers` package and the
folder's tokenizer.json (`encode(text, add_special_tokens=True)`), and the ids
are fed to genai with `append_tokens` (genai's own tokenizer differs from
SentencePiece on code and runs of spaces).  Chat prompts are rendered with the
Phi-3 template `<|user|>\\n{content}<|end|>\\n<|assistant|>\\n` (system and
assistant turns likewise, see `render_chat`).  At most MAX_NEW_TOKENS tokens
are generated; generation stops early at an eos id of genai_config.json
("stop", the eos id is included in token_ids), else "length".  Each step
records the chosen id and the top-5 (id, logit) of the logits it was chosen
from (`Generator.get_logits()`); `min_margin` is the smallest top-1 minus
top-2 logit gap over the steps (per case and per model).  `text_out` is the
HF-tokenizers decode of token_ids with skip_special_tokens=True.

Usage (from the repo root):

    .venv/gen/bin/python tests/gen/oracle.py            # all fixture models
    .venv/gen/bin/python tests/gen/oracle.py tests/fixtures/models/phi3-tiny-mha
    .venv/gen/bin/python tests/gen/oracle.py --check    # re-run, compare with the committed JSON
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime
import onnxruntime_genai as og
from tokenizers import Tokenizer

REPO = Path(__file__).resolve().parents[2]
MODELS = REPO / "tests" / "fixtures" / "models"
ORACLE = REPO / "tests" / "fixtures" / "oracle"
MAX_NEW_TOKENS = 24
TOP_K = 5

CODE = (
    "def fib(n):\n"
    "    if n < 2:\n"
    "        return n\n"
    "    return fib(n - 1) + fib(n - 2)\n"
    "\n"
    "\n"
    "for i in range(10):\n"
    "\tprint(i,    fib(i))  # tab-indented,    spaced\n"
)

LONG_SENTENCES = [
    "Edge devices often run language models without a network connection.",
    "The agent loads an ONNX model, tokenizes the prompt, and streams tokens back.",
    "Quantized weights use four bits per value with a scale for every block of thirty-two.",
    "Grouped-query attention shares each key and value head between several query heads.",
    "A key-value cache keeps the attention state so every step only processes one new token.",
    "Rotary position embeddings rotate query and key vectors by an angle that grows with position.",
    "Greedy decoding always picks the token with the highest logit, so it is fully deterministic.",
    "When the model emits an end token, generation stops and the reply is returned to the caller.",
    "Temperatures, top-k and top-p change the distribution only when sampling is enabled.",
    "Small random models are useful fixtures because they exercise the real operators quickly.",
]


def long_text(tok: Tokenizer, target: int) -> str:
    """~target tokens once wrapped in the chat template."""
    parts: list[str] = []
    i = 0
    while True:
        s = f"{i + 1}. {LONG_SENTENCES[i % len(LONG_SENTENCES)]}"
        candidate = " ".join(parts + [s])
        text = render_chat([{"role": "user", "content": "Summarize the notes below.\n\n" + candidate}])
        if len(tok.encode(text, add_special_tokens=True).ids) > target:
            break
        parts.append(s)
        i += 1
    return "Summarize the notes below.\n\n" + " ".join(parts)


def render_chat(messages: list[dict]) -> str:
    """Phi-3 chat template (tokenizer_config.json's chat_template with
    add_generation_prompt=True)."""
    out = []
    for m in messages:
        tag = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}[m["role"]]
        out.append(f"{tag}\n{m['content']}<|end|>\n")
    out.append("<|assistant|>\n")
    return "".join(out)


def cases(tok: Tokenizer) -> list[dict]:
    chat = lambda name, messages: {"name": name, "kind": "chat", "messages": messages}
    raw = lambda name, text: {"name": name, "kind": "raw", "text": text}
    user = lambda content: [{"role": "user", "content": content}]
    return [
        chat("chat_hello", user("Hello! Who are you?")),
        chat("chat_system", [
            {"role": "system", "content": "You are a concise assistant running on an edge device."},
            {"role": "user", "content": "What is the capital of France?"},
        ]),
        chat("chat_multi_turn", [
            {"role": "user", "content": "Give me a number."},
            {"role": "assistant", "content": "42"},
            {"role": "user", "content": "Now double it, please."},
        ]),
        chat("chat_cjk", user("你好，请用中文介绍一下你自己。東京は日本の首都です。")),
        chat("chat_emoji", user("Explain 🚀 and 🌍 to a child 😀👍🏽 — quickly!")),
        chat("chat_code", user("Fix this code:\n\n" + CODE)),
        chat("chat_long", user(long_text(tok, 990))),
        raw("raw_ascii", "The quick brown fox jumps over the lazy dog. Once upon a time"),
        raw("raw_code", CODE),
        raw("raw_spaces", "a    b\t\tc\n\n\n   d  e     f\n        indented"),
        raw("raw_cjk_mixed", "日本語のテキストと English mixed 한국어 텍스트, 中文也有。"),
        raw("raw_emoji", "🎉🎉 party time 🥳 naïve café façade ünïcödé ✓"),
        raw("raw_short", "Hi"),
    ]


def run_case(model, tok: Tokenizer, eos: set[int], case: dict) -> dict:
    if case["kind"] == "chat":
        case["text"] = render_chat(case["messages"])
    ids = tok.encode(case["text"], add_special_tokens=True).ids
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(ids) + MAX_NEW_TOKENS)
    gen = og.Generator(model, params)
    gen.append_tokens(np.array(ids, dtype=np.int32))
    steps, out = [], []
    while not gen.is_done():
        logits = np.asarray(gen.get_logits(), dtype=np.float32).reshape(-1)
        gen.generate_next_token()
        token = int(gen.get_next_tokens()[0])
        order = np.argsort(-logits, kind="stable")[:TOP_K]
        if token != int(order[0]):
            sys.exit(f"{case['name']}: genai chose {token} but argmax of get_logits() is {int(order[0])}")
        steps.append({"token_id": token, "top": [[int(i), float(logits[i])] for i in order]})
        out.append(token)
        if token in eos:
            break
    margin = min(s["top"][0][1] - s["top"][1][1] for s in steps)
    result = {"name": case["name"], "kind": case["kind"], "text": case["text"]}
    if case["kind"] == "chat":
        result["messages"] = case["messages"]
    result.update({
        "prompt_token_ids": ids,
        "token_ids": out,
        "text_out": tok.decode(out, skip_special_tokens=True),
        "finish_reason": "stop" if out and out[-1] in eos else "length",
        "min_margin": margin,
        "steps": steps,
    })
    return result


def check_chat_template(folder: Path) -> None:
    """render_chat must agree with the folder's own chat_template."""
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    template = cfg.get("chat_template")
    if not template:
        return
    import jinja2

    env = jinja2.Environment()
    for case in cases(Tokenizer.from_file(str(folder / "tokenizer.json"))):
        if case["kind"] == "chat":
            want = env.from_string(template).render(messages=case["messages"], add_generation_prompt=True,
                                                   eos_token=cfg.get("eos_token"), bos_token=cfg.get("bos_token"))
            if want != render_chat(case["messages"]):
                sys.exit(f"render_chat differs from {folder}/tokenizer_config.json chat_template for {case['name']}")


def oracle(folder: Path) -> dict:
    check_chat_template(folder)
    cfg = json.loads((folder / "genai_config.json").read_text())
    eos = cfg["model"]["eos_token_id"]
    eos = set(eos if isinstance(eos, list) else [eos])
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    model = og.Model(str(folder))
    results = [run_case(model, tok, eos, c) for c in cases(tok)]
    return {
        "model": folder.name,
        "genai_version": og.__version__,
        "onnxruntime_version": onnxruntime.__version__,
        "max_new_tokens": MAX_NEW_TOKENS,
        "eos_token_ids": sorted(eos),
        "min_margin": min(r["min_margin"] for r in results),
        "cases": results,
    }


def to_json(data: dict) -> str:
    """Indented JSON with each id list and each step on one line."""
    compact: list[str] = []

    def stash(v):
        compact.append(json.dumps(v, ensure_ascii=False, separators=(",", ":")))
        return f"@@{len(compact) - 1}@@"

    doc = dict(data, cases=[
        dict(c, prompt_token_ids=stash(c["prompt_token_ids"]), token_ids=stash(c["token_ids"]),
             steps=[stash(st) for st in c["steps"]])
        for c in data["cases"]
    ])
    text = json.dumps(doc, indent=1, ensure_ascii=False)
    for i, v in enumerate(compact):
        text = text.replace(f'"@@{i}@@"', v, 1)
    assert json.loads(text) == data
    return text + "\n"


def summary(data: dict) -> str:
    lines = [f"{data['model']}: min_margin={data['min_margin']:.4f}"]
    for c in data["cases"]:
        lines.append(f"  {c['name']:16s} prompt={len(c['prompt_token_ids']):4d} new={len(c['token_ids']):2d} "
                     f"{c['finish_reason']:6s} margin={c['min_margin']:.4f} distinct={len(set(c['token_ids'])):2d} "
                     f"out={c['text_out'][:40]!r}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="*", help="model folders (default: every folder in tests/fixtures/models)")
    p.add_argument("--out-dir", default=str(ORACLE))
    p.add_argument("--check", action="store_true", help="compare with the existing JSON instead of writing it")
    a = p.parse_args()
    folders = [Path(f) for f in a.folders] or sorted(d for d in MODELS.iterdir() if (d / "genai_config.json").exists())
    out_dir = Path(a.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    failed = False
    for folder in folders:
        data = oracle(folder)
        print(summary(data), flush=True)
        path = out_dir / f"{folder.name}.json"
        if a.check:
            old = json.loads(path.read_text())
            same = [c["token_ids"] for c in old["cases"]] == [c["token_ids"] for c in data["cases"]]
            worst = max(abs(x[1] - y[1]) for co, cn in zip(old["cases"], data["cases"])
                        for so, sn in zip(co["steps"], cn["steps"]) for x, y in zip(so["top"], sn["top"]))
            print(f"  check vs {path}: same tokens={same}, max |logit diff| in top-5={worst:.2e}")
            failed |= not same
        else:
            path.write_text(to_json(data))
            print(f"  wrote {path} ({path.stat().st_size:,d} bytes)")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
