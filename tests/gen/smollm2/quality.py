#!/usr/bin/env python3
"""Quality gate for the exported SmolLM2 folder: onnxruntime-genai vs the numpy reference.

For each of 20 chat prompts, the prompt is rendered with the GGUF's ChatML template
(reference.render_chat), tokenized with the Hugging Face `tokenizers` package on the folder's
tokenizer.json, and continued greedily by

* onnxruntime-genai (the exported folder; ids fed with `append_tokens`, like
  tests/gen/oracle.py), and
* reference.py (fp32 numpy Llama forward pass on the GGUF's de-quantized weights),

for up to 16 new tokens each (stopping after an eos id).  A prompt passes when the two token
sequences are identical.  The script prints one line per prompt, both answers to the two
France prompts, and finally

    quality: N/20 prompts with the first 16 tokens identical

and exits 1 when N < 15 (--min).

Usage (from the repo root):
    .venv/test/bin/python tests/gen/smollm2/quality.py GGUF MODEL_DIR
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference import Llama, check_template, render_chat  # noqa: E402

U = lambda text: [{"role": "user", "content": text}]
PROMPTS: list[tuple[str, list[dict]]] = [
    ("france_en", U("What is the capital of France?")),
    ("france_fr", U("Quelle est la capitale de la France ?")),
    ("germany_de", U("Was ist die Hauptstadt von Deutschland?")),
    ("river_es", U("¿Cuál es el río más largo del mundo?")),
    ("hello_zh", U("你好，请介绍一下你自己。")),
    ("emoji", U("Explain 🚀 to a child in one sentence.")),
    ("arith", U("What is 2 + 2?")),
    ("shakespeare", U("Who wrote Romeo and Juliet?")),
    ("week", U("How many days are in a week?")),
    ("boiling", U("What is the boiling point of water in Celsius?")),
    ("colors", U("Name the three primary colors.")),
    ("planet", U("What is the largest planet in our solar system?")),
    ("cpu", U("What does CPU stand for?")),
    ("code_square", U("Write a Python function that returns the square of a number.")),
    ("code_reverse", U("How do I reverse a list in Python?")),
    ("translate", U('Translate "good morning" into Spanish.')),
    ("haiku", U("Write a haiku about the sea.")),
    ("health_tip", U("Give me one short tip for staying healthy.")),
    ("multi_turn_system", [
        {"role": "system", "content": "You are a concise assistant running on an edge device."},
        {"role": "user", "content": "Give me a number between 1 and 10."},
        {"role": "assistant", "content": "7"},
        {"role": "user", "content": "Now double it."},
    ]),
    ("pirate_system", [
        {"role": "system", "content": "You are a friendly pirate. Answer in one sentence."},
        {"role": "user", "content": "How are you today?"},
    ]),
]
SHOW = {"france_en", "france_fr"}


def genai_greedy(model, ids: list[int], max_new: int, eos: set[int]) -> list[int]:
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(ids) + max_new)
    gen = og.Generator(model, params)
    gen.append_tokens(np.array(ids, dtype=np.int32))
    out: list[int] = []
    while not gen.is_done() and len(out) < max_new:
        gen.generate_next_token()
        out.append(int(gen.get_next_tokens()[0]))
        if out[-1] in eos:
            break
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("gguf", type=Path)
    p.add_argument("model_dir", type=Path)
    p.add_argument("--tokens", type=int, default=16, help="new tokens compared per prompt")
    p.add_argument("--show-tokens", type=int, default=48, help="new tokens generated for the printed France answers")
    p.add_argument("--min", type=int, default=15, help="fail below this many identical prompts")
    p.add_argument("--json", type=Path, help="also write the per-prompt results here")
    a = p.parse_args()

    import onnxruntime_genai as og
    from tokenizers import Tokenizer

    t0 = time.time()
    tok = Tokenizer.from_file(str(a.model_dir / "tokenizer.json"))
    cfg = json.loads((a.model_dir / "genai_config.json").read_text())
    eos = cfg["model"]["eos_token_id"]
    eos = set(eos if isinstance(eos, list) else [eos])
    template = json.loads((a.model_dir / "tokenizer_config.json").read_text()).get("chat_template")
    same_template = check_template(template, [m for _, m in PROMPTS])
    if same_template is False:
        sys.exit("reference.render_chat differs from the folder's chat_template")
    ref = Llama(a.gguf)
    model = og.Model(str(a.model_dir))
    try:
        og_tok = og.Tokenizer(model)
    except Exception as e:  # noqa: BLE001 - informational only
        og_tok, og_tok_error = None, str(e)
    print(f"loaded reference and {a.model_dir} in {time.time() - t0:.1f} s; eos ids {sorted(eos)}; chat template "
          f"{'checked with jinja2' if same_template else 'not checked (no jinja2)'}", flush=True)

    n_same, n_tok_same, results = 0, 0, []
    for name, messages in PROMPTS:
        text = render_chat(messages)
        ids = tok.encode(text, add_special_tokens=True).ids
        if og_tok is not None:
            n_tok_same += list(og_tok.encode(text)) == ids
        n = max(a.tokens, a.show_tokens if name in SHOW else 0)
        got = genai_greedy(model, ids, n, eos)
        want, steps = ref.greedy(ids, n, eos)
        same = got[: a.tokens] == want[: a.tokens]
        n_same += same
        detail = ""
        if not same:
            i = next(i for i, (x, y) in enumerate(zip(got + [-1], want + [-2])) if x != y)
            if i < len(steps):
                top = np.sort(steps[i])[-2:]
                detail = f" (first difference at token {i}: reference top-1/top-2 logit gap {top[1] - top[0]:.3f})"
        print(f"  {name:18s} {'same' if same else 'DIFF'}  {tok.decode(got[: a.tokens])!r}{detail}", flush=True)
        if not same:
            print(f"  {'':18s} ref   {tok.decode(want[: a.tokens])!r}")
        results.append({"name": name, "prompt_ids": ids, "genai": got, "reference": want, "same": same})
        if name in SHOW:
            print(f"      genai:     {tok.decode(got, skip_special_tokens=False)!r}")
            print(f"      reference: {tok.decode(want, skip_special_tokens=False)!r}")
    if og_tok is not None:
        print(f"onnxruntime-genai's own tokenizer gives the same prompt ids on {n_tok_same}/{len(PROMPTS)} prompts")
    else:
        print(f"onnxruntime-genai's own tokenizer did not load: {og_tok_error}")
    if a.json:
        a.json.write_text(json.dumps(results) + "\n")
    print(f"quality: {n_same}/{len(PROMPTS)} prompts with the first {a.tokens} tokens identical "
          f"({time.time() - t0:.0f} s)")
    sys.exit(0 if n_same >= a.min else 1)


if __name__ == "__main__":
    main()
