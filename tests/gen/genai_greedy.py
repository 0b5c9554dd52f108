#!/usr/bin/env python3
"""Live greedy reference: onnxruntime-genai on prompt ids chosen by the caller.

tests/smollm2.rs renders and tokenizes its prompts with the engine (`Model::encode` and
`Model::encode_chat`), writes them to a cases file and runs this script, so genai is fed
exactly the engine's ids (`append_tokens`) and the two greedy decodes can be compared token
for token.  Independently of the engine, every case is also tokenized here the way Hugging
Face does it: chat messages are rendered with the folder's tokenizer_config.json
`chat_template` under jinja2 configured as `transformers` configures it (sandboxed,
trim_blocks, lstrip_blocks, loopcontrols, `raise_exception`), then encoded with the
`tokenizers` package and the folder's tokenizer.json (`add_special_tokens=True`); the test
asserts that these reference ids equal the engine's.

Cases file (JSON):

    {"cases": [{"name": str, "kind": "chat"|"raw", "token_ids": [int],
                "messages": [{"role", "content"}] (chat) | "text": str (raw)}]}

Output on stdout (JSON):

    {"genai_version", "onnxruntime_version", "max_new_tokens", "eos_token_ids",
     "cases": [{"name", "reference_text", "reference_prompt_ids", "token_ids",
                "text_out", "finish_reason", "min_margin", "margins",
                "steps": [[[id, logit] x TOP_K] per step]}]}

Generation is greedy (`do_sample=False`, `max_length` = prompt + max_new_tokens) and ends
at an eos id of genai_config.json ("stop", the eos id is kept in token_ids) or at the
length ("length").  `margins[i]` is the top-1 minus top-2 logit of step i, `min_margin`
their minimum: where it is tiny, a one-ulp difference in a matmul may flip the argmax.

Usage (from the repo root, with the test venv of `make venv`):

    .venv/test/bin/python tests/gen/genai_greedy.py --model-dir .models/smollm2-135m-instruct \\
        --cases cases.json --max-new-tokens 32
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

TOP_K = 5


def chat_renderer(folder: Path):
    """A function messages -> text rendering the folder's chat template as transformers does
    (`PreTrainedTokenizerBase.apply_chat_template` with add_generation_prompt=True)."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    cfg = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    template = cfg.get("chat_template")
    if isinstance(template, list):  # named templates: transformers picks "default"
        named = {t["name"]: t["template"] for t in template}
        template = named.get("default", next(iter(named.values()), None))
    if not template:
        sys.exit(f"{folder}/tokenizer_config.json has no chat_template")

    def token(field):
        v = cfg.get(field)
        return v.get("content") if isinstance(v, dict) else v

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    compiled = env.from_string(template)
    return lambda messages: compiled.render(
        messages=messages, add_generation_prompt=True, bos_token=token("bos_token"), eos_token=token("eos_token")
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", required=True, type=Path)
    p.add_argument("--cases", required=True, type=Path)
    p.add_argument("--max-new-tokens", required=True, type=int)
    a = p.parse_args()

    import onnxruntime
    import onnxruntime_genai as og
    from tokenizers import Tokenizer

    folder = a.model_dir
    cases = json.loads(a.cases.read_text(encoding="utf-8"))["cases"]
    config = json.loads((folder / "genai_config.json").read_text(encoding="utf-8"))
    eos = config["model"]["eos_token_id"]
    eos = set(eos if isinstance(eos, list) else [eos])
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    render = chat_renderer(folder)
    model = og.Model(str(folder))

    results = []
    for case in cases:
        text = render(case["messages"]) if case["kind"] == "chat" else case["text"]
        ids = [int(i) for i in case["token_ids"]]
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=len(ids) + a.max_new_tokens)
        gen = og.Generator(model, params)
        gen.append_tokens(np.array(ids, dtype=np.int32))
        out, steps, margins = [], [], []
        while not gen.is_done():
            logits = np.asarray(gen.get_logits(), dtype=np.float32).reshape(-1)
            gen.generate_next_token()
            token = int(gen.get_next_tokens()[0])
            order = np.argsort(-logits, kind="stable")[:TOP_K]
            if token != int(order[0]):
                sys.exit(f"{case['name']}: genai chose {token} but the argmax of get_logits() is {int(order[0])}")
            steps.append([[int(i), float(logits[i])] for i in order])
            margins.append(float(logits[order[0]] - logits[order[1]]))
            out.append(token)
            if token in eos:
                break
        results.append({
            "name": case["name"],
            "reference_text": text,
            "reference_prompt_ids": tok.encode(text, add_special_tokens=True).ids,
            "token_ids": out,
            "text_out": tok.decode(out, skip_special_tokens=True),
            "finish_reason": "stop" if out and out[-1] in eos else "length",
            "min_margin": min(margins) if margins else None,
            "margins": margins,
            "steps": steps,
        })
    json.dump({
        "genai_version": og.__version__,
        "onnxruntime_version": onnxruntime.__version__,
        "max_new_tokens": a.max_new_tokens,
        "eos_token_ids": sorted(eos),
        "cases": results,
    }, sys.stdout, ensure_ascii=False)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
