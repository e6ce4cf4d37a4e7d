#!/usr/bin/python3
"""HF tokenizer.json in C++ (retnet-tokenize) against HF's own JS implementation.

Trains small BPE tokenizers here (no PyPI: a few dozen lines of BPE training) in the styles of
real models, writes them as tokenizer.json (and a GPT-2 vocab.json + merges.txt pair), then
encodes and decodes training and held-out texts with both retnet-tokenize and
@huggingface/tokenizers (tests/model/hf_oracle, pinned by its package-lock.json). Ids and decoded
text must be identical; for byte-level styles the concatenated TokenBytes must be the exact
UTF-8 of the text (what a streaming server emits).

Styles: gpt2 (ByteLevel pre-tokenizer and decoder), llama3 (Split with the Llama-3 regex, then
ByteLevel without regex; specials and lstrip/rstrip added tokens), llama_sp (SentencePiece-like:
Prepend + Replace normalizers, byte_fallback, Replace/ByteFallback/Fuse/Strip decoders),
metaspace (NFKC + Lowercase, Metaspace prepend_scheme first, byte_fallback) and gpt2_files
(vocab.json + merges.txt; the JS side reads the equivalent tokenizer.json); synthetic (a
64k-token byte-level vocabulary of random merge chains with the Llama-3 split).

Usage: test_hf_tokenizer.py --tokenize build/bin/retnet-tokenize --node /usr/bin/node
Exit code 77 (skipped) when node or the npm package is missing.
"""
import argparse
import collections
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ORACLE_DIR = os.path.join(HERE, "hf_oracle")

sys.path.insert(0, os.path.join(HERE, "..", "..", "tools"))
from convert_tokenizer import bytes_to_unicode  # noqa: E402  (GPT-2's byte map)

LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Python's re has no \p{..}: close approximations, used only to count words for training.
GPT2_TRAIN_RE = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?[^\W\d_]+| ?\d+| ?[^\s\w]+|\s+(?!\S)|\s+")
LLAMA3_TRAIN_RE = re.compile(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\w]?[^\W\d_]+|\d{1,3}|"
                             r" ?[^\s\w]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SPACE = "\u2581"

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "I'm sure they'll say it's fine, but we've seen what THEY'RE doing and don't like it.",
    "Numbers: 1234567890, 3.14159, 42 and 1000000 + 7 = 1000007.",
    "Whitespace    runs\tand\ttabs\n\nand newlines\r\nend   ",
    "   leading spaces and a trailing tab\t",
    "Emoji: \U0001F600 \U0001F44D\U0001F3FD family \U0001F468\u200D\U0001F469\u200D\U0001F467\u200D\U0001F466 "
    "flag \U0001F1EF\U0001F1F5 heart \u2764\uFE0F",
    "\u6771\u4eac\u306f\u65e5\u672c\u306e\u9996\u90fd\u3067\u3059\u3002\u4eca\u65e5\u306f\u3044\u3044\u5929\u6c17\u3002",
    "\u4e2d\u6587\u5206\u8bcd\u6d4b\u8bd5\uff0c\u6211\u4eec\u559c\u6b22\u5b66\u4e60\u3002",
    "\uc548\ub155\ud558\uc138\uc694 \uc138\uacc4",
    "Caf\u00e9, cafe\u0301, Zo\u00eb, na\u00efve, Ti\u1ebfng Vi\u1ec7t c\u00f3 d\u1ea5u.",
    "\u0645\u0631\u062d\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644\u0645 \u0648 \u0634\u0643\u0631\u0627",
    "\u05e9\u05dc\u05d5\u05dd \u05e2\u05d5\u05dc\u05dd, \u05de\u05d4 \u05e9\u05dc\u05d5\u05de\u05da?",
    "\u0928\u092e\u0938\u094d\u0924\u0947 \u0926\u0941\u0928\u093f\u092f\u093e",
    "\u039a\u03b1\u03bb\u03b7\u03bc\u03ad\u03c1\u03b1 \u039f\u0394\u039f\u03a3 \u03ba\u03cc\u03c3\u03bc\u03b5",
    "\u041f\u0440\u0438\u0432\u0435\u0442, \u043c\u0438\u0440! \u041a\u0430\u043a \u0434\u0435\u043b\u0430?",
    "def f(x):\n    return x**2  # square\n\nprint(f(12))",
    "https://example.com/path?q=1&lang=en#top <b>bold</b> {\"json\": [1, 2]}",
    "the the the there then these those other another brother",
    "Ligatures \ufb01 \ufb02, circled \u2460\u2461, full-width \uff21\uff22\uff23 x\u00b2",
]

HELD_OUT = [
    "",
    " ",
    "a",
    "Hello world! It's 2024 and we're testing 123456789 digits.",
    "A completely unseen sentence about zebras, quartz and jukeboxes.",
    "\U0001F9D1\u200D\U0001F4BB codes at \U0001F319; \U0001F1FA\U0001F1F8 \U0001F3F3\uFE0F\u200D\U0001F308",
    "\u5317\u4eac\u5927\u5b66\u3068\u6771\u4eac\u5927\u5b66",
    "\u0627\u0644\u0633\u0644\u0627\u0645 \u0639\u0644\u064a\u0643\u0645 123",
    "mixed\u00a0no-break\u2003em space\u3000ideographic",
    "tabs\t\t\tand\n\n\nnewlines\r\n\r\n",
    "trailing spaces     ",
    "     ",
    "\n",
    "a\u0308o\u0308u\u0308 combining and \u1e9b\u0323 dot",
    "SHOUTING ΣΟΦΟΣ and quiet \u03c3\u03bf\u03c6\u03cc\u03c2",
    "x = [i**2 for i in range(10)]  # list comprehension",
    "I'LL, YOU'D, he'S, 'tis",
    "\U0001F600\U0001F600\U0001F600\U0001F600",
    "\u00ff\u00fe\u0100\u0101 latin extended \u0131\u0130",
    "\u0f00 \u1000\u1001 \u16a0\u16a1 rare scripts \U00010348",
]

BYTE_STYLES = {"gpt2", "llama3", "gpt2_files", "synthetic"}

# Pieces of random texts (fixed seed): every script and whitespace kind above, contractions,
# digits, punctuation, ZWJ emoji, combining marks, the metaspace character itself and fragments
# of special tokens. U+0085 and U+FEFF stay out: Oniguruma's and JavaScript's \s disagree on them.
ATOMS = [
    "a", "b", "the", "The", " ", "  ", "   ", "\t", "\n", "\r\n", "\n\n", "0", "7", "42", "2024",
    "1234567", ".", ",", "!", "?", "'", "\"", "(", ")", "[", "]", "{", "}", "-", "_", "/", "\\", "@",
    "#", "$", "%", "^", "&", "*", "+", "=", "<", ">", "|", "~", "`", "'s", "'re", "'LL", "'d", "n't",
    "\u6771\u4eac", "\u4e2d", "\u3002", "\uc548\ub155", "\u3042", "\U0001F600", "\U0001F44D\U0001F3FD",
    "\U0001F468\u200D\U0001F469\u200D\U0001F467", "\U0001F1EF\U0001F1F5", "\u2764\uFE0F", "e\u0301",
    "\u0308", "\u00e9", "\u00df", "\u0645\u0631\u062d\u0628\u0627", "\u05e9\u05dc\u05d5\u05dd",
    "\u0928\u092e\u0938\u094d", "\u03a3", "\u03c3", "\u039f\u0394\u039f\u03a3", "\u041f\u0440\u0438",
    "\u00a0", "\u2003", "\u3000", "\u2581", "\uff21", "\ufb01", "\u2460", "\u00b2", "\u0130",
    "\u0131", "\U00010348", "<", "<|", "|>", "<s", "</", "[CODE", "CODE]", "<0x41>", "quick",
    "brown", "fox", "lazy", "dog", "caf\u00e9", "Zo\u00eb",
]


def fuzz_texts(rng, specials, n):
    atoms = ATOMS + specials + ["[CODE]", "[/CODE]"]
    return ["".join(rng.choice(atoms) for _ in range(rng.randint(1, 14))) for _ in range(n)]


def random_id_lists(rng, name, vocab_size, n):
    # SentencePiece-like styles: no byte-fallback ids (3..258). For an invalid byte run HF's
    # Rust decoder writes one U+FFFD per byte, the JS one one per maximal subpart.
    pool = [i for i in range(vocab_size)
            if name in BYTE_STYLES or not 3 <= i <= 258]
    return [[rng.choice(pool) for _ in range(rng.randint(1, 12))] for _ in range(n)]


BYTE_MAP = bytes_to_unicode()


def train_bpe(word_counts, num_merges):
    """word_counts: {tuple of symbols: count}. Returns the merges, most frequent pair first."""
    words = [[list(w), c] for w, c in word_counts.items()]
    merges, done = [], set()
    for _ in range(num_merges):
        pairs = collections.Counter()
        for syms, c in words:
            for a, b in zip(syms, syms[1:]):
                if (a, b) not in done:
                    pairs[(a, b)] += c
        if not pairs:
            break
        (a, b), n = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        merges.append((a, b))
        done.add((a, b))
        for w in words:
            syms, out, i = w[0], [], 0
            while i < len(syms):
                if i + 1 < len(syms) and syms[i] == a and syms[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(syms[i])
                    i += 1
            w[0] = out
    return merges


def build_vocab(base, merges):
    vocab = {}
    for s in base:
        vocab.setdefault(s, len(vocab))
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    return vocab


def byte_level_words(texts, regex):
    counts = collections.Counter()
    for t in texts:
        for w in regex.findall(t):
            counts[tuple(BYTE_MAP[b] for b in w.encode("utf-8"))] += 1
    return counts


def added(content, id_, special=True, lstrip=False, rstrip=False, normalized=None):
    return {"id": id_, "content": content, "single_word": False, "lstrip": lstrip,
            "rstrip": rstrip, "normalized": (not special) if normalized is None else normalized,
            "special": special}


def tokenizer_json(model, added_tokens, normalizer=None, pre_tokenizer=None, decoder=None):
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added_tokens,
            "normalizer": normalizer, "pre_tokenizer": pre_tokenizer, "post_processor": None,
            "decoder": decoder, "model": model}


def bpe_model(vocab, merges, array_merges, **extra):
    m = {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
         "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
         "ignore_merges": False, "vocab": vocab,
         "merges": [[a, b] for a, b in merges] if array_merges else ["%s %s" % (a, b) for a, b in merges]}
    m.update(extra)
    return m


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False)


def make_gpt2(d, files=False):
    merges = train_bpe(byte_level_words(CORPUS, GPT2_TRAIN_RE), 400)
    vocab = build_vocab(sorted(BYTE_MAP.values()), merges)
    eot = len(vocab)
    vocab_with_eot = dict(vocab, **{"<|endoftext|>": eot})
    tj = tokenizer_json(
        bpe_model(vocab_with_eot, merges, array_merges=False),
        [added("<|endoftext|>", eot)],
        pre_tokenizer={"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                       "use_regex": True},
        decoder={"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                 "use_regex": True})
    specials = ["<|endoftext|>"]
    if not files:
        write_json(os.path.join(d, "tokenizer.json"), tj)
        write_json(os.path.join(d, "tokenizer_config.json"),
                   {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"})
        return os.path.join(d, "tokenizer.json"), d, specials
    # vocab.json + merges.txt for C++; the equivalent tokenizer.json (elsewhere) for the oracle.
    cxx = os.path.join(d, "files")
    os.mkdir(cxx)
    write_json(os.path.join(cxx, "vocab.json"), vocab_with_eot)
    with open(os.path.join(cxx, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for a, b in merges:
            f.write("%s %s\n" % (a, b))
    write_json(os.path.join(d, "tokenizer.json"), tj)
    return os.path.join(d, "tokenizer.json"), cxx, specials


LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                   "<|end_header_id|>", "<|eot_id|>"]


def make_llama3(d):
    merges = train_bpe(byte_level_words(CORPUS, LLAMA3_TRAIN_RE), 500)
    vocab = build_vocab(sorted(BYTE_MAP.values()), merges)
    toks = []
    for name in LLAMA3_SPECIALS:
        toks.append(added(name, len(vocab) + len(toks)))
    # Non-special added tokens, one with lstrip and one with rstrip.
    toks.append(added("[CODE]", len(vocab) + len(toks), special=False, lstrip=True))
    toks.append(added("[/CODE]", len(vocab) + len(toks), special=False, rstrip=True))
    full = dict(vocab)
    for t in toks:
        full[t["content"]] = t["id"]
    tj = tokenizer_json(
        bpe_model(full, merges, array_merges=True, ignore_merges=True),
        toks,
        pre_tokenizer={"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA3_REGEX}, "behavior": "Isolated",
             "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
             "use_regex": False}]},
        decoder={"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                 "use_regex": True})
    write_json(os.path.join(d, "tokenizer.json"), tj)
    write_json(os.path.join(d, "tokenizer_config.json"),
               {"bos_token": "<|begin_of_text|>", "eos_token": {"content": "<|eot_id|>"}})
    return os.path.join(d, "tokenizer.json"), d, LLAMA3_SPECIALS


def make_synthetic(d):
    """A real-sized byte-level vocabulary (64k tokens, random merge chains up to 16 bytes) with
    the Llama-3 split: deep merge sequences and a large rank table."""
    rng = random.Random(1)
    toks = sorted(BYTE_MAP.values())
    vocab = {c: i for i, c in enumerate(toks)}
    merges = []
    while len(vocab) < 65536:
        a = rng.choice(toks[-5000:] if len(toks) > 5000 and rng.random() < 0.5 else toks[:2000])
        b = rng.choice(toks[:300])
        if a + b in vocab or len(a + b) > 16:
            continue
        vocab[a + b] = len(vocab)
        toks.append(a + b)
        merges.append((a, b))
    eot = len(vocab)
    vocab["<|endoftext|>"] = eot
    tj = tokenizer_json(
        bpe_model(vocab, merges, array_merges=True), [added("<|endoftext|>", eot)],
        pre_tokenizer={"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA3_REGEX}, "behavior": "Isolated",
             "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]},
        decoder={"type": "ByteLevel"})
    write_json(os.path.join(d, "tokenizer.json"), tj)
    # Texts made of the vocabulary's own long tokens, so that deep merge chains run.
    inverse = {c: b for b, c in BYTE_MAP.items()}
    words = []
    for tok in toks[-20000:]:
        try:
            words.append(bytes(inverse[c] for c in tok).decode("utf-8"))
        except UnicodeDecodeError:
            pass
    extra = ["".join(rng.choice(words) for _ in range(rng.randint(1, 8))) for _ in range(100)]
    return os.path.join(d, "tokenizer.json"), d, ["<|endoftext|>"], extra


def sp_words(texts, normalize):
    counts = collections.Counter()
    for t in texts:
        n = normalize(t)
        for w in re.findall(SPACE + "[^" + SPACE + "]*|[^" + SPACE + "]+", n):
            counts[tuple(w)] += 1
    return counts


def make_sp(d, metaspace):
    import unicodedata
    if metaspace:
        def normalize(t):
            return SPACE + unicodedata.normalize("NFKC", t).lower().replace(" ", SPACE)
    else:
        def normalize(t):
            return SPACE + t.replace(" ", SPACE)
    counts = sp_words(CORPUS, normalize)
    chars = collections.Counter()
    for w, c in counts.items():
        for ch in w:
            chars[ch] += c
    # Characters seen once stay out of the vocab: they go through byte fallback.
    base = ["<unk>", "<s>", "</s>"] + ["<0x%02X>" % b for b in range(256)]
    base += sorted(ch for ch, c in chars.items() if c >= 2)
    known = set(base)
    counts = {w: c for w, c in counts.items() if all(ch in known for ch in w)}
    merges = train_bpe(counts, 400)
    vocab = build_vocab(base, merges)
    toks = [added("<unk>", 0), added("<s>", 1), added("</s>", 2)]
    model = bpe_model(vocab, merges, array_merges=metaspace, unk_token="<unk>", fuse_unk=True,
                      byte_fallback=True)
    if metaspace:
        toks.append(added("<sep>", len(vocab)))
        vocab["<sep>"] = len(vocab)
        tj = tokenizer_json(
            model, toks,
            normalizer={"type": "Sequence", "normalizers": [{"type": "NFKC"},
                                                            {"type": "Lowercase"}]},
            pre_tokenizer={"type": "Metaspace", "replacement": SPACE, "prepend_scheme": "first",
                           "split": False},
            decoder={"type": "Sequence", "decoders": [
                {"type": "ByteFallback"},
                {"type": "Metaspace", "replacement": SPACE, "prepend_scheme": "first",
                 "split": False}]})
        specials = ["<unk>", "<s>", "</s>", "<sep>"]
    else:
        tj = tokenizer_json(
            model, toks,
            normalizer={"type": "Sequence", "normalizers": [
                {"type": "Prepend", "prepend": SPACE},
                {"type": "Replace", "pattern": {"String": " "}, "content": SPACE}]},
            decoder={"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": SPACE}, "content": " "},
                {"type": "ByteFallback"}, {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0}]})
        specials = ["<unk>", "<s>", "</s>"]
    write_json(os.path.join(d, "tokenizer.json"), tj)
    return os.path.join(d, "tokenizer.json"), d, specials


def texts_for(specials):
    texts = list(CORPUS) + list(HELD_OUT)
    s0, s1 = specials[0], specials[-1]
    texts += [
        "Hello%sWorld" % s1,
        "%s leading special and trailing %s" % (s0, s1),
        "%s%s%s" % (s0, s0, s1),
        "partial <|endoftex and <s and </ s> are plain text",
        "emoji\U0001F600%s\U0001F44D" % s1,
        "  spaces  %s  around  " % s0,
    ]
    return texts


def run_cxx(tokenize, d, texts, id_lists=()):
    inp = "".join(json.dumps(t) + "\n" for t in texts)
    inp += "".join(json.dumps({"ids": ids}) + "\n" for ids in id_lists)
    p = subprocess.run([tokenize, "--dir", d, "--json"], input=inp.encode("utf-8"),
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=300)
    if p.returncode != 0:
        raise RuntimeError("retnet-tokenize failed: %s" % p.stderr.decode(errors="replace"))
    lines = p.stdout.decode("utf-8").splitlines()
    return json.loads(lines[0]), [json.loads(x) for x in lines[1:]]


def run_oracle(node, tj_path, config_path, texts, tmp, id_lists=()):
    job = os.path.join(tmp, "job.json")
    write_json(job, {"tokenizer": tj_path, "config": config_path, "texts": texts,
                     "id_lists": list(id_lists)})
    p = subprocess.run([node, os.path.join(ORACLE_DIR, "oracle.js"), job],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=300)
    if p.returncode == 77:
        print("SKIP: " + p.stderr.decode(errors="replace").strip())
        sys.exit(77)
    if p.returncode != 0:
        raise RuntimeError("oracle failed: %s" % p.stderr.decode(errors="replace"))
    out = json.loads(p.stdout.decode("utf-8"))
    return out["results"], out["decodes"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenize", required=True)
    ap.add_argument("--node", default="")
    ap.add_argument("--fuzz", type=int, default=300, help="random texts and id lists per style")
    args = ap.parse_args()
    node = args.node or shutil.which("node") or ""
    if not node or not os.path.exists(node):
        print("SKIP: node is not installed")
        return 77
    if not os.path.isdir(os.path.join(ORACLE_DIR, "node_modules", "@huggingface", "tokenizers")):
        print("SKIP: @huggingface/tokenizers is not installed "
              "(scripts/build.sh runs npm ci --prefix tests/model/hf_oracle)")
        return 77

    failures = []
    compared = 0
    tmp = tempfile.mkdtemp(prefix="hf_oracle_")
    try:
        styles = [
            ("gpt2", lambda d: make_gpt2(d)),
            ("gpt2_files", lambda d: make_gpt2(d, files=True)),
            ("llama3", make_llama3),
            ("llama_sp", lambda d: make_sp(d, metaspace=False)),
            ("metaspace", lambda d: make_sp(d, metaspace=True)),
            ("synthetic", make_synthetic),
        ]
        for name, make in styles:
            d = os.path.join(tmp, name)
            os.mkdir(d)
            made = make(d)
            tj_path, cxx_dir, specials = made[:3]
            config = os.path.join(d, "tokenizer_config.json")
            texts = texts_for(specials)
            if name == "llama3":
                texts += ["x [CODE]  print(1)  [/CODE]   y", "[CODE][/CODE]", "a\t[CODE]\n\nb"]
            texts += made[3] if len(made) > 3 else []
            rng = random.Random(1234)
            texts += fuzz_texts(rng, specials, args.fuzz)
            info, _ = run_cxx(args.tokenize, cxx_dir, [])
            id_lists = random_id_lists(rng, name, info["vocab_size"], args.fuzz)
            _, out = run_cxx(args.tokenize, cxx_dir, texts, id_lists)
            got, got_decodes = out[:len(texts)], out[len(texts):]
            want, want_decodes = run_oracle(node, tj_path,
                                            config if os.path.exists(config) else None, texts,
                                            tmp, id_lists)
            for ids, g, w in zip(id_lists, got_decodes, want_decodes):
                compared += 1
                if g["decode"] != w:
                    failures.append("%s: decode(%s) differs\n  C++:    %r\n  oracle: %r"
                                    % (name, ids, g["decode"], w))
                streamed = bytes.fromhex(g["bytes_hex"])
                if name in BYTE_STYLES and streamed.decode("utf-8", errors="replace") != w:
                    failures.append("%s: %s: TokenBytes %r do not decode to %r"
                                    % (name, ids, streamed, w))
            if len(got) != len(want):
                failures.append("%s: %d results from C++, %d from the oracle"
                                % (name, len(got), len(want)))
                continue
            mismatched = 0
            # The comparison must exercise merges (fewer ids than bytes) and, for the
            # SentencePiece-like styles, byte fallback (<0x00>..<0xFF> are ids 3..258).
            n_ids = sum(len(g.get("ids", [])) for g in got)
            n_bytes = sum(len(t.encode("utf-8")) for t in texts)
            if name == "synthetic":
                # Random merges rarely fit real text: require merged tokens in use instead.
                if sum(1 for g in got for i in g.get("ids", []) if 256 <= i < 65536) < 500:
                    failures.append("synthetic: merges are not exercised")
            elif not n_ids * 10 < n_bytes * (7 if name in BYTE_STYLES else 9):
                failures.append("%s: %d ids for %d bytes: merges are not exercised"
                                % (name, n_ids, n_bytes))
            if name in ("llama_sp", "metaspace") and not any(
                    3 <= i <= 258 for g in got for i in g.get("ids", [])):
                failures.append("%s: byte fallback is not exercised" % name)
            for text, g, w in zip(texts, got, want):
                compared += 1
                if "error" in g:
                    failures.append("%s: %r: C++ error %s" % (name, text, g["error"]))
                    continue
                if g["ids"] != w["ids"]:
                    mismatched += 1
                    failures.append("%s: %r: ids differ\n  C++:    %s\n  oracle: %s"
                                    % (name, text, g["ids"], w["ids"]))
                if g["decode"] != w["decode"]:
                    mismatched += 1
                    failures.append("%s: %r: decode differs\n  C++:    %r\n  oracle: %r"
                                    % (name, text, g["decode"], w["decode"]))
                streamed = bytes.fromhex(g["bytes_hex"])
                plain = not any(s in text for s in specials) and "[" not in text
                if name in BYTE_STYLES:
                    # Streaming is byte-exact: the TokenBytes are the text's own UTF-8.
                    if streamed.decode("utf-8", errors="replace") != g["decode"] or (
                            plain and streamed != text.encode("utf-8")):
                        failures.append("%s: %r: TokenBytes concatenation %r is not the text"
                                        % (name, text, streamed))
                elif name == "llama_sp" and plain:
                    # The metaspace character in the text itself also streams as a space.
                    expect = (" " + text.replace(SPACE, " ")).encode("utf-8") if text else b""
                    if streamed != expect:
                        failures.append("%s: %r: TokenBytes concatenation %r, expected %r"
                                        % (name, text, streamed, expect))
            print("%-10s kind=%s vocab=%d bos=%d eos=%d: %d texts (%d bytes, %d ids), %d id "
                  "lists decoded, %d mismatches"
                  % (name, info["kind"], info["vocab_size"], info["bos_id"], info["eos_id"],
                     len(texts), n_bytes, n_ids, len(id_lists), mismatched))
            if name == "llama3" and (info["bos_id"] < 0 or info["eos_id"] < 0):
                failures.append("llama3: bos/eos from tokenizer_config.json not found")
            # A model whose vocabulary is smaller than the tokenizer's ids is refused.
            p = subprocess.run([args.tokenize, "--dir", cxx_dir, "--vocab-size", "100"],
                               input=b"", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            err = p.stderr.decode(errors="replace")
            if p.returncode != 1 or ("tokenizer.json" not in err and "vocab.json" not in err):
                failures.append("%s: vocab_size 100 not refused naming the file: rc=%d %s"
                                % (name, p.returncode, err))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for f in failures[:40]:
        print("FAIL " + f)
    print("%d comparisons, %d failures" % (compared, len(failures)))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
