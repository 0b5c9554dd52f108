#!/usr/bin/env python3
"""Verify the Phi-3 tokenizer fixtures written by make_tokenizer.py.

Usage:
    check_tokenizer.py [--dir DIR] [--package DIR] [--no-node] [--fuzz N]

--dir      fixture dir (default: <repo>/tests/fixtures/tokenizer)
--package  unpacked llama-tokenizer-js 1.2.2 used for the node cross-check
           (default: /tmp/ltk/package if present, else `npm pack` into a temp dir)
--no-node  skip the cross-check against the npm package
--fuzz N   number of extra seeded random strings for the cross-check (default 500)

Needs Python 3.11 + `tokenizers`, and `node` (>= 18) for the cross-check.
Exits non-zero if any check fails.
"""
from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

from tokenizers import Tokenizer

sys.dont_write_bytecode = True  # no __pycache__ next to the scripts
sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_tokenizer as mk  # noqa: E402

DEFAULT_DIR = mk.DEFAULT_OUT
FAILURES: list[str] = []


def check(name: str, ok: bool, detail: str = "") -> None:
    print(f"{'PASS' if ok else 'FAIL'}  {name}" + (f"  -- {detail}" if detail and not ok else ""))
    if not ok:
        FAILURES.append(name)


ROUNDTRIP = [
    "Hello world",
    "Hello, world! How are you?",
    "  two leading spaces",
    " one leading space",
    "trailing spaces   ",
    "multiple    spaces     inside",
    "line1\nline2\n\nline4\n",
    "\n\nstarts with newlines",
    "def f(x):\n    if x:\n        return x  # comment\n\treturn None\n",
    "fn main() {\n    let v: Vec<u8> = vec![1, 2, 3];\n}\n",
    "你好，世界！这是一个测试。",
    "日本語のテキストとカタカナ",
    "한국어 텍스트",
    "Emoji: 🦙🚀👍🏽 👨‍👩‍👧",
    "🦙",
    "Ünïcödé àccents — and “quotes” … ©®™",
    "Привет, мир! Ελληνικά العربية עברית",
    "tabs\tand\r\ncarriage returns",
    "numbers 1234567890 3.14159 -42",
    "a",
    " ",
    "",
    "<0x0A> literal byte-token text",
    "x" * 200,
    "   \n   \n",
]

# Cross-check corpus (no added-token strings: llama-tokenizer-js has no notion of them).
CROSS = ROUNDTRIP + [
    "The quick brown fox jumps over the lazy dog.",
    "grabbed",
    " grabbed",
    "           grabbed",
    "\n",
    " \n",
    "ax\n####\nboo",
    "镇",
    "🦙🙋🏿‍♀️ llamas are cute",
    "import numpy as np\n\nclass Foo:\n    def __init__(self):\n        self.x  =  [1,  2,   3]\n",
    "<html>\n  <body>\n    <p class=\"x\">Hi &amp; bye</p>\n  </body>\n</html>",
    "SELECT * FROM users WHERE id = 42;  -- trailing comment",
    "混合 mixed 文本 text 123 😀 end",
    "𠀀𠀁𪚥 rare CJK extension chars then ascii",
    "e\u0301 combining acute, ﬁ ligature, ｆｕｌｌ width",
    "\u00a0non-breaking\u00a0space and \u3000ideographic space",
    "literal ▁ marker ▁▁ and ▁leading",
]

POOL = (
    list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
    + list(" " * 12 + "\n" * 4 + "\t\r")
    + list("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")
    + list("éèàüößçñøåœ") + list("你好世界中文测试镇龘齉") + list("こんにちはカタカナ")
    + list("привет") + list("αβγ") + list("🦙🚀😀👍🏽") + ["\u200d", "\u0301", "\u00a0", "▁"]
    + ["the", " the", "ing", "tion", "    ", "def ", "return", "Hello", " world"]
)


def fuzz_strings(n: int, seed: int = 1234) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(POOL) for _ in range(rng.randint(1, 40))) for _ in range(n)]


NODE_SCRIPT = r"""
import { pathToFileURL } from 'node:url';
import { readFileSync } from 'node:fs';
const mod = await import(pathToFileURL(process.argv[1] + '/llama-tokenizer.js').href);
const tok = mod.default;
const inputs = JSON.parse(readFileSync(0, 'utf8'));
// encode(prompt, add_bos_token, add_preceding_space): no BOS, like Phi-3.
process.stdout.write(JSON.stringify(inputs.map(s => tok.encode(s, false, true))));
"""


def node_encode(pkg: Path, inputs: list[str]) -> list[list[int]]:
    out = subprocess.run(
        ["node", "--input-type=module", "-e", NODE_SCRIPT, str(pkg)],
        input=json.dumps(inputs), capture_output=True, text=True, check=True,
    )
    return json.loads(out.stdout)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    ap.add_argument("--package", type=Path)
    ap.add_argument("--no-node", action="store_true")
    ap.add_argument("--fuzz", type=int, default=500)
    args = ap.parse_args()

    tok = Tokenizer.from_file(str(args.dir / "tokenizer.json"))
    tj = json.loads((args.dir / "tokenizer.json").read_text(encoding="utf-8"))
    cfg = json.loads((args.dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    stm = json.loads((args.dir / "special_tokens_map.json").read_text(encoding="utf-8"))

    # --- chat prompt ---
    ids = tok.encode("<|user|>\nHello<|end|>\n<|assistant|>\n", add_special_tokens=True).ids
    check("chat prompt -> [32010, 15043, 32007, 32001]", ids == [32010, 15043, 32007, 32001], str(ids))
    ids = tok.encode("<|system|>\nBe brief.<|end|>\n<|user|>\nHi there<|end|>\n<|assistant|>\n").ids
    exp = [32006] + tok.encode("Be brief.").ids + [32007, 32010] + tok.encode("Hi there").ids + [32007, 32001]
    check("system+user chat prompt (rstrip eats '\\n' after specials)", ids == exp, f"{ids} != {exp}")
    ids = tok.encode("Bye<|endoftext|> x").ids
    check("<|endoftext|> does not rstrip", ids == tok.encode("Bye").ids + [32000] + tok.encode(" x").ids, str(ids))

    # --- Llama-2 facts ---
    ids = tok.encode("Hello world", add_special_tokens=True).ids
    check("'Hello world' -> [15043, 3186] (no BOS)", ids == [15043, 3186], str(ids))
    check("vocab size with added tokens == 32011", tok.get_vocab_size(with_added_tokens=True) == 32011,
          str(tok.get_vocab_size(with_added_tokens=True)))
    check("vocab size without added tokens == 32000", tok.get_vocab_size(with_added_tokens=False) == 32000)
    check("id 13 == <0x0A>", tok.id_to_token(13) == "<0x0A>", str(tok.id_to_token(13)))
    check("id 29871 == '▁'", tok.id_to_token(29871) == "\u2581")
    for tid, content, _ in mk.ADDED_TOKENS:
        check(f"added token {content} == {tid}", tok.token_to_id(content) == tid, str(tok.token_to_id(content)))
    ids = tok.encode("\n").ids
    check("'\\n' -> [29871, 13]", ids == [29871, 13], str(ids))
    enc = tok.encode("🦙")
    exp_bytes = [f"<0x{b:02X}>" for b in "🦙".encode("utf-8")]
    check("emoji byte fallback tokens", enc.tokens == ["\u2581"] + exp_bytes, str(enc.tokens))
    check("emoji byte ids in 3..258", all(3 <= i <= 258 for i in enc.ids[1:]) and enc.ids[1:] == [3 + b for b in "🦙".encode()],
          str(enc.ids))
    check("emoji decodes back", tok.decode(enc.ids) == "🦙", repr(tok.decode(enc.ids)))
    check("no <unk> produced for emoji/CJK", 0 not in tok.encode("𠀀🦙你好").ids)
    ids = tok.encode("Hello world", "How are you").ids
    check("pair adds no specials", ids == tok.encode("Hello world").ids + tok.encode("How are you").ids, str(ids))

    # --- round trips ---
    bad = [s for s in ROUNDTRIP if tok.decode(tok.encode(s).ids) != s]
    check(f"decode(encode(x)) == x for {len(ROUNDTRIP)} strings", not bad,
          "; ".join(f"{s!r} -> {tok.decode(tok.encode(s).ids)!r}" for s in bad))
    # A literal U+2581 '▁' in the input is indistinguishable from a space after
    # normalization (same as SentencePiece), so it decodes to ' ': that is inherent
    # to the Llama/Phi-3 tokenizer, not a fixture bug. Check exactly that.
    s = "literal ▁ marker ▁▁ and ▁leading"
    check("literal '▁' decodes as ' ' (inherent, lossy)", tok.decode(tok.encode(s).ids) == s.replace("\u2581", " "))
    fz = fuzz_strings(args.fuzz)
    bad = [s for s in fz if tok.decode(tok.encode(s).ids) != s.replace("\u2581", " ")]
    check(f"decode(encode(x)) == x for {len(fz)} fuzz strings ('▁' -> ' ')", not bad,
          "; ".join(repr(s) for s in bad[:5]))
    # Added tokens are matched in raw text (as in HF Phi-3); informational only.
    print(f"      info: literal '<s>' in text encodes to {tok.encode('a<s>b').ids} (added-token match)")

    # --- json structure / configs ---
    m = tj["model"]
    check("model BPE flags", (m["type"], m["byte_fallback"], m["fuse_unk"], m["unk_token"], m["dropout"])
          == ("BPE", True, True, "<unk>", None))
    check("pre_tokenizer is null", tj["pre_tokenizer"] is None)
    check("normalizer Prepend+Replace", [n["type"] for n in tj["normalizer"]["normalizers"]] == ["Prepend", "Replace"])
    check("decoder Replace,ByteFallback,Fuse,Strip",
          [d["type"] for d in tj["decoder"]["decoders"]] == ["Replace", "ByteFallback", "Fuse", "Strip"])
    check("tokenizer_config basics",
          (cfg["add_bos_token"], cfg["add_eos_token"], cfg["bos_token"], cfg["eos_token"], cfg["pad_token"],
           cfg["unk_token"], cfg["model_max_length"], cfg["legacy"], cfg["clean_up_tokenization_spaces"],
           cfg["padding_side"], cfg["tokenizer_class"], cfg["sp_model_kwargs"])
          == (False, False, "<s>", "<|endoftext|>", "<|endoftext|>", "<unk>", 4096, False, False, "left",
              "LlamaTokenizer", {}))
    check("chat_template exact", cfg["chat_template"] == mk.CHAT_TEMPLATE)
    atd = {int(k): v for k, v in cfg["added_tokens_decoder"].items()}
    tj_added = {t["id"]: {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
                for t in tj["added_tokens"]}
    check("added_tokens_decoder matches tokenizer.json added_tokens", atd == tj_added)
    check("rstrip only false for <unk>,<s>,</s>,<|endoftext|>",
          sorted(i for i, t in tj_added.items() if not t["rstrip"]) == [0, 1, 2, 32000])
    check("special_tokens_map", {k: v["content"] for k, v in stm.items()}
          == {"bos_token": "<s>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": "<unk>"})

    # --- cross-check against llama-tokenizer-js ---
    if not args.no_node:
        with tempfile.TemporaryDirectory() as tmp:
            pkg = args.package
            if pkg is None:
                pkg = Path("/tmp/ltk/package")
                if not (pkg / "llama-tokenizer.js").exists():
                    pkg = mk.fetch_package(Path(tmp))
            inputs = CROSS + fz
            js = node_encode(pkg, inputs)
        diffs = []
        for s, j in zip(inputs, js):
            h = tok.encode(s, add_special_tokens=True).ids
            if h != j:
                diffs.append((s, h, j))
        check(f"HF == llama-tokenizer-js on {len(CROSS)} curated strings",
              not [d for d in diffs if d[0] in CROSS], "")
        check(f"HF == llama-tokenizer-js on {len(fz)} fuzz strings", not [d for d in diffs if d[0] not in CROSS], "")
        for s, h, j in diffs[:10]:
            print(f"      diff {s!r}\n        hf={h}\n        js={j}")
        total = sum(len(x) for x in js)
        print(f"      cross-checked {len(inputs)} strings, {total} tokens, {len(diffs)} differing")

    print(f"\n{'FAILED: ' + ', '.join(FAILURES) if FAILURES else 'ALL CHECKS PASSED'}")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
