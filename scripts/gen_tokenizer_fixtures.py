"""Reference fixtures for the tokenizers deltatune rebuilds from GGUF metadata and for the chat
templates it renders, written to tests/fixtures/tokenizers/:

* `gemma3.json`, `smollm2.json`: the ids llama.cpp (llama-cpp-python, `vocab_only=True`) gives
  for STRINGS on the real Gemma 3 270M file (SentencePiece, 262,144 pieces) and the real
  SmolLM2-135M-Instruct file (byte-level BPE, `smollm` pre-tokenizer), with and without BOS,
  special tokens parsed (`special=True`).
* `spm_synthetic.json`: a small SentencePiece vocabulary (pieces, scores, token types) trained
  here, Llama 2 style (`add_space_prefix` true, BOS added, byte fallback, a control and a
  user-defined token), and the ids llama.cpp gives on the GGUF file written from it.
* `bpe_pre.json`: a small byte-level BPE vocabulary (trained here with the `tokenizers` package
  on the strings themselves, without pre-tokenization, so that its merges cross the places
  where the family pre-tokenizers split) and, for each pre-tokenizer llama.cpp names `qwen2`,
  `llama-bpe` and `tekken`: the ids llama.cpp gives on the GGUF file written with that
  `tokenizer.ggml.pre`, and the pre-tokenized pieces of the `tokenizers` package with the
  pre-tokenizer of the family's tokenizer.json (Split on its regex, isolated, then ByteLevel
  without regex), as transformers' Qwen2TokenizerFast / Llama 3 / Mistral Nemo load it.
* `chat_templates.json` with `templates/*.jinja`: renderings by transformers'
  `render_jinja_template` (the code behind `apply_chat_template`) of several conversations with
  the chat templates of Gemma 3, Gemma 2, Qwen2.5, Qwen3, Llama 3 and Llama 3.2 (and one of block tags on
  lines of their own), and the messages of the
  errors the templates raise. The template sources are listed in `templates/SOURCES.md`.

    /work/venv-ref/bin/python scripts/gen_tokenizer_fixtures.py \
        --gemma /work/models/gemma-3-270m-q4_k_m.gguf \
        --smollm2 ~/.cache/deltatune/models/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf

Needs gguf, llama-cpp-python, tokenizers, transformers (and jinja2). Deterministic: running it
again writes the same files (except the `versions` entries when packages change).
"""

import argparse
import datetime
import hashlib
import json
import os
import random
import sys
import tempfile
from pathlib import Path

import gguf
import llama_cpp
import tokenizers
import transformers
from tokenizers import Regex, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "tokenizers"

# Varied text: spaces (leading, trailing, runs), newlines, tabs, digits, accents, other
# scripts, emoji, code, URLs, contractions, special tokens of each vocabulary.
STRINGS = [
    "Hello world",
    " Hello world",
    "Hello world ",
    "Hello   world",
    "  two leading spaces",
    "line one\nline two\n\nline four",
    "\n\n\nstarts with newlines",
    "tabs\tand\t\ttabs",
    "The year 2024 had 366 days; 1234567890.",
    "3.14159 + 2.71828 = 5.85987",
    "Café, naïve, résumé, Ångström, façade",
    "Ελληνικά και русский текст",
    "日本語のテキストと中文文本",
    "한국어 텍스트",
    "Emoji: 😀🎉👍🏽 and 🇫🇷",
    "def f(x):\n    return x ** 2  # square\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n",
    "<bos>text after bos",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>",
    "I'm sure you're right, they've said it's done and we'll see. DON'T SHOUT",
    "https://example.com/path?q=1&r=two#frag",
    "    indented with four spaces",
    "a",
    "",
    "!!!???...,,,",
    "ＦＵＬＬＷＩＤＴＨ letters",
    "mixed\r\nwindows\r\nlines",
    "word" + " " * 40 + "end",
    "<table><tr><td>1</td></tr></table>",
    "zero\u200bwidth and non\u00a0breaking",
    "ß ẞ İ ı ǅ ſ",
    "CamelCaseWord and snake_case_word, HTTPServer",
    "  \n  \n",
]


def dump(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        json.dump(value, f, indent=1, ensure_ascii=False)
        f.write("\n")


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def versions():
    return {
        "python": sys.version.split()[0],
        "llama_cpp_python": llama_cpp.__version__,
        "gguf": getattr(gguf, "__version__", "installed"),
        "tokenizers": tokenizers.__version__,
        "transformers": transformers.__version__,
    }


def llama_ids(llm, text, add_bos):
    return [int(t) for t in llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)]


def real_file_fixture(path, name):
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    cases = []
    for s in STRINGS:
        cases.append({"text": s, "ids": llama_ids(llm, s, False), "ids_bos": llama_ids(llm, s, True)})
    dump(OUT / f"{name}.json", {
        "generator": "scripts/gen_tokenizer_fixtures.py",
        "what": "llama.cpp's ids (Llama(vocab_only=True).tokenize(text, add_bos, special=True))",
        "file": path.name,
        "file_bytes": path.stat().st_size,
        "file_sha256": sha256(path),
        "versions": versions(),
        "cases": cases,
    })
    print(f"{name}: {len(cases)} strings")


def write_hparams(w):
    """The llama hyper-parameters llama.cpp reads before it loads a vocabulary."""
    w.add_context_length(256)
    w.add_embedding_length(16)
    w.add_block_count(1)
    w.add_feed_forward_length(32)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(8)


def write_gguf(path, kv):
    """A GGUF file without tensors: architecture `llama`, the keys in `kv` (name -> (kind, value))."""
    w = gguf.GGUFWriter(str(path), "llama")
    write_hparams(w)
    for key, (kind, value) in kv.items():
        if kind == "str":
            w.add_string(key, value)
        elif kind == "bool":
            w.add_bool(key, value)
        elif kind == "u32":
            w.add_uint32(key, value)
        elif kind == "arr":
            w.add_array(key, value)
        elif kind == "f32arr":
            w.add_key_value(key, value, gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.FLOAT32)
        elif kind == "i32arr":
            w.add_key_value(key, value, gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.INT32)
        else:
            raise ValueError(kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# ------------------------------------------------------------------ SentencePiece (Llama 2 style)

SPM_CORPUS = (
    "the quick brown fox jumps over the lazy dog . hello world , hello there . "
    "line one line two line four starts with newlines tabs and tabs the year had days "
    "i am sure you are right they have said it is done and we will see . "
    "indented with four spaces two leading spaces mixed windows lines word end "
    "for int i sum += a[i] ; def f(x): return x ** 2 # square 0123456789 "
    "café naïve résumé "
)


def train_spm_pieces(corpus, n_merges):
    """BPE merges over '▁'-prefixed words (ties broken by the pair's text), as SentencePiece
    BPE learns them; returns the merged pieces in the order learned."""
    words = {}
    for w in corpus.split():
        key = tuple("▁" + w)
        words[key] = words.get(key, 0) + 1
    pieces = []
    for _ in range(n_merges):
        pairs = {}
        for word, n in words.items():
            for a, b in zip(word, word[1:]):
                pairs[(a, b)] = pairs.get((a, b), 0) + n
        if not pairs:
            break
        best = sorted(pairs.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]
        pieces.append(best[0] + best[1])
        new = {}
        for word, n in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            new[tuple(out)] = new.get(tuple(out), 0) + n
        words = new
    return pieces


def spm_fixture(tmp):
    # Llama 2's layout: <unk> (type 2), <s>, </s> (control), 256 byte pieces (type 6), then the
    # learned pieces and single characters (scores: learned order, characters last; ids
    # shuffled); plus one control and one user-defined token at the end.
    tokens, scores, types = ["<unk>", "<s>", "</s>"], [0.0, 0.0, 0.0], [2, 3, 3]
    for b in range(256):
        tokens.append(f"<0x{b:02X}>")
        scores.append(0.0)
        types.append(6)
    merged = train_spm_pieces(SPM_CORPUS, 160)
    chars = sorted(set("▁" + SPM_CORPUS.replace(" ", "")) - set(merged))
    pieces = [(p, -float(i)) for i, p in enumerate(merged)]
    pieces += [(c, -float(len(merged) + i)) for i, c in enumerate(chars)]
    # Ids in shuffled order, so that merging by id instead of by score gives other ids.
    random.Random(7).shuffle(pieces)
    for p, score in pieces:
        tokens.append(p)
        scores.append(score)
        types.append(1)
    for t, ty in [("<|turn|>", 3), ("<sep>", 4), ("<|endoftext|>", 3)]:
        tokens.append(t)
        scores.append(0.0)
        types.append(ty)
    kv = {
        "tokenizer.ggml.model": ("str", "llama"),
        "tokenizer.ggml.tokens": ("arr", tokens),
        "tokenizer.ggml.scores": ("f32arr", scores),
        "tokenizer.ggml.token_type": ("i32arr", types),
        "tokenizer.ggml.bos_token_id": ("u32", 1),
        "tokenizer.ggml.eos_token_id": ("u32", 2),
        "tokenizer.ggml.unknown_token_id": ("u32", 0),
        "tokenizer.ggml.add_bos_token": ("bool", True),
        "tokenizer.ggml.add_eos_token": ("bool", False),
        "tokenizer.ggml.add_space_prefix": ("bool", True),
    }
    path = tmp / "spm.gguf"
    write_gguf(path, kv)
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    extra = ["<|turn|>user said<sep> hi<|turn|>", "hello<s>world</s>", "the lazy dog jumps"]
    cases = [{"text": s, "ids": llama_ids(llm, s, False), "ids_bos": llama_ids(llm, s, True)}
             for s in STRINGS + extra]
    # The same vocabulary named as a Phi-3 model: llama.cpp then strips the whitespace after
    # special tokens (but not after <unk>, <s>); user-defined ones too.
    kv["general.name"] = ("str", "Phi-3 Mini Synthetic")
    path = tmp / "spm-phi3.gguf"
    write_gguf(path, kv)
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    phi3_texts = ["<|turn|>  user said\n<sep>\n\n hi <|turn|>\tend", "<s> x </s>  y", "a <unk> b",
                  "the <|turn|>\n"]
    phi3_cases = [{"text": s, "ids": llama_ids(llm, s, False), "ids_bos": llama_ids(llm, s, True)}
                  for s in phi3_texts]
    dump(OUT / "spm_synthetic.json", {
        "generator": "scripts/gen_tokenizer_fixtures.py",
        "what": "a SentencePiece vocabulary trained on SPM_CORPUS, Llama 2 style; llama.cpp's ids on "
                "the GGUF file holding exactly these tokenizer.ggml.* keys",
        "versions": versions(),
        "tokens": tokens,
        "scores": scores,
        "token_type": types,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "unknown_token_id": 0,
        "add_bos_token": True,
        "add_space_prefix": True,
        "cases": cases,
        "phi3_general_name": "Phi-3 Mini Synthetic",
        "phi3_cases": phi3_cases,
    })
    print(f"spm_synthetic: {len(tokens)} tokens, {len(cases)} strings")


# ------------------------------------------------------------------ byte-level BPE pre-tokenizers

# The regexes of the families' tokenizer.json files (Split, behavior Isolated).
HF_REGEX = {
    # Qwen/Qwen2.5-0.5B-Instruct tokenizer.json (Qwen2 and Qwen3 use the same)
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    # meta-llama/Meta-Llama-3-8B tokenizer.json
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    # mistralai/Mistral-Nemo-Instruct-2407 tokenizer.json
    "tekken": r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}

BPE_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>"]


def hf_pre_tokenizer(name):
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(HF_REGEX[name]), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])


def bpe_vocab():
    """Byte-level BPE trained on STRINGS without pre-tokenization (whole strings are words), so
    merges span the split points of the family regexes."""
    tok = tokenizers.Tokenizer(BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    trainer = BpeTrainer(vocab_size=900, min_frequency=1, show_progress=False,
                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    plain = []
    for s in STRINGS:
        for sp in BPE_SPECIALS:
            s = s.replace(sp, " ")
        if s:
            plain.append(s)
    corpus = plain * 3 + [s.upper() for s in plain]
    tok.train_from_iterator(corpus, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in vocab]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    types = [1] * len(tokens)
    for s in BPE_SPECIALS:
        tokens.append(s)
        types.append(3)
    return tokens, types, merges


def bpe_fixture(tmp):
    tokens, types, merges = bpe_vocab()
    bos = tokens.index("<|begin_of_text|>")
    texts = [s for s in STRINGS] + ["x<|im_start|>y z<|im_end|>", "  <|endoftext|>  "]
    out = {}
    for name in HF_REGEX:
        kv = {
            "tokenizer.ggml.model": ("str", "gpt2"),
            "tokenizer.ggml.pre": ("str", name),
            "tokenizer.ggml.tokens": ("arr", tokens),
            "tokenizer.ggml.token_type": ("i32arr", types),
            "tokenizer.ggml.merges": ("arr", merges),
            "tokenizer.ggml.bos_token_id": ("u32", bos),
            "tokenizer.ggml.eos_token_id": ("u32", tokens.index("<|endoftext|>")),
        }
        if name == "qwen2":
            # Qwen's files say false; llama-bpe and tekken files omit it here, so the default
            # (true for those two in llama.cpp) is what is checked.
            kv["tokenizer.ggml.add_bos_token"] = ("bool", False)
        path = tmp / f"bpe-{name}.gguf"
        write_gguf(path, kv)
        llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
        pre = hf_pre_tokenizer(name)
        cases = []
        for s in texts:
            cases.append({
                "text": s,
                "ids": llama_ids(llm, s, False),
                "ids_bos": llama_ids(llm, s, True),
                "hf_pieces": [p for p, _ in pre.pre_tokenize_str(s)],
            })
        out[name] = {"add_bos_token": kv.get("tokenizer.ggml.add_bos_token", (None, None))[1],
                     "hf_regex": HF_REGEX[name], "cases": cases}
        print(f"bpe_pre {name}: {len(cases)} strings")
    dump(OUT / "bpe_pre.json", {
        "generator": "scripts/gen_tokenizer_fixtures.py",
        "what": "a byte-level BPE vocabulary trained on STRINGS; per pre-tokenizer, llama.cpp's ids on "
                "the GGUF file with these keys and tokenizer.ggml.pre = the name, and the pieces of the "
                "`tokenizers` package's pre-tokenizer for that family",
        "versions": versions(),
        "tokens": tokens,
        "token_type": types,
        "merges": merges,
        "bos_token_id": bos,
        "eos_token_id": tokens.index("<|endoftext|>"),
        "pre": out,
    })


# ------------------------------------------------------------------ chat templates

TEMPLATES = {
    "gemma3": {"file": "gemma3.jinja", "bos_token": "<bos>", "eos_token": "<eos>"},
    "qwen2.5": {"file": "qwen2.5.jinja", "bos_token": None, "eos_token": "<|im_end|>"},
    "qwen3": {"file": "qwen3.jinja", "bos_token": None, "eos_token": "<|im_end|>"},
    "llama3": {"file": "llama3.jinja", "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
    "llama3.2": {"file": "llama3.2.jinja", "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
    "gemma2": {"file": "gemma2.jinja", "bos_token": "<bos>", "eos_token": "<eos>"},
    # Not a model's: block tags on indented lines of their own (trim_blocks, lstrip_blocks).
    "blocks": {"file": "blocks.jinja", "bos_token": None, "eos_token": None},
}

CHATS = {
    "user": [{"role": "user", "content": "Hello!"}],
    "system_user": [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "What is 2 + 2?"},
    ],
    "multi_turn": [
        {"role": "system", "content": "  Answer in French.  "},
        {"role": "user", "content": "Hi\n"},
        {"role": "assistant", "content": " Bonjour ! "},
        {"role": "user", "content": "How are you?"},
    ],
    "ends_with_assistant": [
        {"role": "user", "content": "Spell cat."},
        {"role": "assistant", "content": "C-A-T"},
    ],
    "thinking": [
        {"role": "user", "content": "Think first."},
        {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nDone."},
        {"role": "user", "content": "Again."},
        {"role": "assistant", "content": "<think>\nok\n</think>\n\nDone again."},
    ],
    "unicode": [{"role": "user", "content": "Café 日本 😀 <b>bold</b> & \"quotes\""}],
    "two_users": [
        {"role": "user", "content": "one"},
        {"role": "user", "content": "two"},
    ],
}

# A fixed date for strftime_now, so the Llama 3.2 renderings do not depend on the day.
FIXED_NOW = datetime.datetime(2026, 3, 7, 12, 0, 0)


def render_all():
    from transformers.utils import chat_template_utils as ctu

    class FixedDatetime(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return FIXED_NOW

    ctu.datetime = FixedDatetime  # strftime_now reads datetime.now()
    ctu._cached_compile_jinja_template.cache_clear() if hasattr(ctu._cached_compile_jinja_template, "cache_clear") else None
    tdir = OUT / "templates"
    results = []
    for name, spec in TEMPLATES.items():
        text = (tdir / spec["file"]).read_text(encoding="utf-8")
        for chat_name, chat in CHATS.items():
            for agp in (True, False):
                for with_specials in (True, False):
                    kwargs = {}
                    if with_specials:
                        if spec["bos_token"] is not None:
                            kwargs["bos_token"] = spec["bos_token"]
                        if spec["eos_token"] is not None:
                            kwargs["eos_token"] = spec["eos_token"]
                    else:
                        kwargs["bos_token"] = ""
                        kwargs["eos_token"] = ""
                    entry = {"template": name, "chat": chat_name, "add_generation_prompt": agp,
                             "bos_token": kwargs.get("bos_token"), "eos_token": kwargs.get("eos_token")}
                    try:
                        rendered, _ = ctu.render_jinja_template(
                            conversations=[chat], chat_template=text, add_generation_prompt=agp, **kwargs)
                        entry["rendered"] = rendered[0]
                    except Exception as e:  # the template's raise_exception
                        entry["error"] = str(e)
                    results.append(entry)
    dump(OUT / "chat_templates.json", {
        "generator": "scripts/gen_tokenizer_fixtures.py",
        "what": "transformers' render_jinja_template (apply_chat_template's renderer: jinja2 sandbox, "
                "trim_blocks, lstrip_blocks, raise_exception, strftime_now fixed to "
                f"{FIXED_NOW.date().isoformat()}) of CHATS with each template; bos_token null means "
                "the template's tokenizer has none (not passed)",
        "strftime_now": FIXED_NOW.date().isoformat(),
        "versions": versions(),
        "chats": CHATS,
        "templates": {k: v["file"] for k, v in TEMPLATES.items()},
        "renderings": results,
    })
    print(f"chat_templates: {len(results)} renderings")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gemma", default="/work/models/gemma-3-270m-q4_k_m.gguf")
    ap.add_argument("--smollm2", default=os.path.expanduser(
        "~/.cache/deltatune/models/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf"))
    a = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    for path, name in [(Path(a.gemma), "gemma3"), (Path(a.smollm2), "smollm2")]:
        if path.is_file():
            real_file_fixture(path, name)
        else:
            print(f"{name}: {path} not found, keeping the existing fixture")
    with tempfile.TemporaryDirectory() as tmp:
        spm_fixture(Path(tmp))
        bpe_fixture(Path(tmp))
    render_all()


if __name__ == "__main__":
    main()
