#!/usr/bin/python3
"""A served checkpoint with each HF tokenizer kind streams text equal to HF's own decoding.

usage: test_served_tokenizers.py --server build/bin/retnet-server --stubs build/python
                                 [--node /usr/bin/node]

For each tokenizer style of tests/model/test_hf_tokenizer.py (gpt2 and llama3 byte-level
tokenizer.json, gpt2_files = a GPT-2 vocab.json + merges.txt pair, llama_sp SentencePiece-like
with Prepend/Replace normalizers, byte fallback and the Replace/ByteFallback/Fuse/Strip decoders,
metaspace with NFKC + Lowercase and the Metaspace decoder), the tokenizer files and a random fla
checkpoint whose vocabulary is the tokenizer's are written to one directory and served by
retnet-server; @huggingface/tokenizers (tests/model/hf_oracle) is the oracle:
1. GetModelInfo: tokenizer "hf" (tokenizer.json) or "gpt2" (vocab.json + merges.txt), the
   tokenizer's vocabulary;
2. Tokenize of multilingual texts (emoji with ZWJ and skin tones, CJK, combining marks,
   whitespace runs, digits, an embedded special token) equals the oracle's ids (and add_bos puts
   the BOS first);
3. a greedy Generate turn (ignore_eos, 40 tokens, a named session) on a text prompt: its prompt
   is BOS (when the server adds one) + the oracle's ids of the text; the streamed text (every
   Token.text, then Final.text) equals the oracle's incremental decoding of the session's ids;
   Detokenize of the generated ids equals the oracle's decode of them;
4. a second text turn on the same session streams the incremental decoding over the whole
   conversation (turn 1's ids, then the oracle's ids of turn 2's text alone, then turn 2's).
Exit code 77 (skipped) when node or the npm package is missing.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, os.path.join(HERE, "..", "model"))
sys.path.insert(0, os.path.join(HERE, "..", "..", "tools"))
from harness import FAILURES, ServerProcess, check  # noqa: E402
import test_hf_tokenizer as hft  # noqa: E402

NEW_TOKENS = 40

STYLES = [
    # name, builder, expected ModelInfo.tokenizer
    ("gpt2", lambda d: hft.make_gpt2(d), "hf"),
    ("gpt2_files", lambda d: hft.make_gpt2(d, files=True), "gpt2"),
    ("llama3", hft.make_llama3, "hf"),
    ("llama_sp", lambda d: hft.make_sp(d, metaspace=False), "hf"),
    ("metaspace", lambda d: hft.make_sp(d, metaspace=True), "hf"),
]

PROMPT1 = "Hello world! It's 2024: \u6771\u4eac\u306f\u3044\u3044\u5929\u6c17 \U0001F600, caf\u00e9 and"
PROMPT2 = "  Then   42 more \u041f\u0440\u0438\u0432\u0435\u0442 e\u0301\u0308 \U0001F44D\U0001F3FD?"


def tokenize_texts(specials):
    s0, s1 = specials[0], specials[-1]
    return [
        "Emoji: \U0001F600 \U0001F44D\U0001F3FD family "
        "\U0001F468\u200D\U0001F469\u200D\U0001F467\u200D\U0001F466 flag \U0001F1EF\U0001F1F5",
        "\u6771\u4eac\u306f\u65e5\u672c\u306e\u9996\u90fd\u3067\u3059\u3002\u4e2d\u6587\uc548\ub155",
        "a\u0308o\u0308u\u0308 combining, cafe\u0301 vs caf\u00e9, \u1e9b\u0323",
        "tabs\t\t\tand\n\n\nnewlines\r\n   spaces     ",
        "     ",
        "Numbers 1234567890, 3.14159 and 1000007",
        "Hello%sWorld" % s1,
        "%s leading special and  %s  trailing" % (s0, s1),
    ]


def vocab_size_of(tj_path):
    tj = json.load(open(tj_path, encoding="utf-8"))
    ids = list(tj["model"]["vocab"].values()) + [t["id"] for t in tj["added_tokens"]]
    return max(ids) + 1


def byte_fallback_rule(tj_path):
    """For a tokenizer with a ByteFallback decoder: ids -> the ids whose JS decoding is HF's Rust
    decoding of `ids`. The two differ on an invalid run of byte tokens (<0xNN>): the Rust crate
    (and so Python transformers, and model/hf_tokenizer.h's Decode) writes one U+FFFD per byte of
    the run, the JS port one per maximal ill-formed subpart (the WHATWG rule, which is also what a
    byte-exact stream gives). Special ids are dropped first (skip_special_tokens, before the
    decoders: runs join across them); each invalid run becomes that many <0xEF><0xBF><0xBD>.
    None for a tokenizer without ByteFallback (byte-level ones: Rust's from_utf8_lossy is the
    WHATWG rule too)."""
    tj = json.load(open(tj_path, encoding="utf-8"))
    if '"ByteFallback"' not in json.dumps(tj["decoder"]):
        return None
    byte_of = {i: int(t[3:5], 16) for t, i in tj["model"]["vocab"].items()
               if len(t) == 6 and t.startswith("<0x") and t.endswith(">")}
    id_of = {b: i for i, b in byte_of.items()}
    specials = {t["id"] for t in tj["added_tokens"] if t["special"]}
    fffd = [id_of[b] for b in "\ufffd".encode("utf-8")]

    def rule(ids):
        out, run = [], []

        def flush():
            bad = bytes(byte_of[i] for i in run)
            try:
                bad.decode("utf-8")
                out.extend(run)
            except UnicodeDecodeError:
                out.extend(fffd * len(run))
            run.clear()

        for i in ids:
            if i in specials:
                continue
            if i in byte_of:
                run.append(i)
            else:
                flush()
                out.append(i)
        flush()
        return out
    return rule


def make_model(ckpt, vocab):
    import torch
    from bench_gpu import make_checkpoint  # torch is imported there
    make_checkpoint({"layers": 2, "d": 64, "heads": 2, "inter": 128, "vocab": vocab}, ckpt,
                    seed=7, dtype=torch.float32)
    path = os.path.join(ckpt, "config.json")
    config = json.load(open(path))
    config.pop("tokenizer", None)  # the tokenizer files in the directory decide
    with open(path, "w") as fh:
        json.dump(config, fh, indent=2)


def incremental(decode, before, after):
    """The text that ids `after` add to a sequence that already holds `before`:
    decode(before + after) minus decode(before). A streaming detokenizer emits exactly this: the
    decoders' positional rules (Strip's or Metaspace's dropped leading space of the sequence's
    first token) apply at the start of the whole sequence, not of each turn, and a character
    split across the boundary belongs to the side that completes it. None when decode(before) is
    not a prefix of decode(before + after) (then no streaming can be equal)."""
    whole, head = decode(before + after), decode(before)
    return whole[len(head):] if whole.startswith(head) else None


def run_style(args, pb, pb_grpc, grpc, tmp, name, make, kind):
    d = os.path.join(tmp, name)
    os.mkdir(d)
    tj_path, cxx_dir, specials = make(d)[:3]
    config = os.path.join(d, "tokenizer_config.json")
    config = config if os.path.exists(config) else None
    vocab = vocab_size_of(tj_path)
    # gpt2_files: the checkpoint beside vocab.json + merges.txt (the tokenizer.json the oracle
    # reads is one directory up, out of the server's sight).
    make_model(cxx_dir, vocab)
    texts = tokenize_texts(specials)
    enc, _ = hft.run_oracle(args.node, tj_path, config, texts + [PROMPT1, PROMPT2], d)
    want_ids = {t: r["ids"] for t, r in zip(texts + [PROMPT1, PROMPT2], enc)}

    server = ServerProcess(args.server, tmp, name, "--checkpoint", cxx_dir,
                           log=os.path.join(tmp, name + ".log"))
    try:
        channel = grpc.insecure_channel(server.target)
        stub = pb_grpc.RetNetStub(channel)
        info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=60)
        check(info.tokenizer == kind and info.vocab_size == vocab,
              f"{name}: 1. ModelInfo tokenizer {kind!r}, vocabulary {vocab} "
              f"({info.tokenizer!r}, {info.vocab_size}, bos {info.bos_token_id})")
        bos = info.bos_token_id

        for t in texts:
            got = list(stub.Tokenize(pb.TokenizeRequest(text=t), timeout=60).ids)
            check(got == want_ids[t], f"{name}: 2. Tokenize({t!r}) equals the oracle"
                  + ("" if got == want_ids[t] else f"\n  server: {got}\n  oracle: {want_ids[t]}"))
        if bos >= 0:
            got = list(stub.Tokenize(pb.TokenizeRequest(text=texts[0], add_bos=True), timeout=60).ids)
            check(got == [bos] + want_ids[texts[0]], f"{name}: 2. Tokenize add_bos puts BOS {bos} first")

        def turn(text):
            req = pb.GenerateRequest(session_id="s-" + name, create_session=True, text=text)
            req.sampling.temperature = 0
            req.stopping.max_new_tokens = NEW_TOKENS
            req.stopping.ignore_eos = True
            ids, streamed, final = [], "", None
            for msg in stub.Generate(req, timeout=60):
                if msg.HasField("chunk"):
                    ids += [t.id for t in msg.chunk.tokens]
                    streamed += "".join(t.text for t in msg.chunk.tokens)
                else:
                    final = msg.final
            check(final is not None and final.finish_reason == pb.FINISH_REASON_LENGTH
                  and len(ids) == NEW_TOKENS,
                  f"{name}: a turn of {NEW_TOKENS} tokens ends by length ({len(ids)})")
            return ids, streamed + (final.text if final else ""), final

        # Turn 1: the server adds BOS on a fresh session when the tokenizer has one (the
        # checkpoint's tokenizer_config.json does not say add_bos_token: false here).
        prompt1 = ([bos] if bos >= 0 else []) + want_ids[PROMPT1]
        gen1, text1, final1 = turn(PROMPT1)
        check(final1 is not None and final1.usage.prompt_tokens == len(prompt1),
              f"{name}: 3. turn 1's prompt is BOS + the oracle's ids "
              f"({final1.usage.prompt_tokens if final1 else None} vs {len(prompt1)})")
        # Turn 2: the server encodes turn 2's text alone (no BOS on a later turn).
        prompt2 = want_ids[PROMPT2]
        gen2, text2, final2 = turn(PROMPT2)
        check(final2 is not None and final2.usage.prompt_tokens == len(prompt2)
              and final2.usage.session_tokens_total == len(prompt1) + 2 * NEW_TOKENS + len(prompt2),
              f"{name}: 4. turn 2's prompt is the oracle's ids of its text alone")

        # Every decode the checks need, in one oracle run.
        history1 = prompt1 + gen1
        history2 = history1 + prompt2
        lists = [prompt1, history1, history2, history2 + gen2, gen1, gen2]
        # Detokenize follows HF's Rust decoding (see byte_fallback_rule); streaming cannot (it
        # would have to hold every byte token until its run ends) and follows the JS port.
        rust = byte_fallback_rule(tj_path) or (lambda ids: ids)
        lists += [rust(gen1), rust(gen2)]
        _, decs = hft.run_oracle(args.node, tj_path, config, [], d, lists)
        table = {json.dumps(ids): s for ids, s in zip(lists, decs)}

        def decode(ids):
            return table[json.dumps(ids)]

        want1 = incremental(decode, prompt1, gen1)
        check(text1 == want1, f"{name}: 3. turn 1 streams the oracle's incremental decoding"
              + ("" if text1 == want1 else
                 f"\n  ids:      {history1}\n  streamed: {text1!r}\n  oracle:   {want1!r}"))
        want2 = incremental(decode, history2, gen2)
        check(text2 == want2, f"{name}: 4. turn 2 streams the incremental decoding over the "
              "whole conversation"
              + ("" if text2 == want2 else
                 f"\n  ids:      {history2 + gen2}\n  streamed: {text2!r}\n  oracle:   {want2!r}"))
        for k, gen in ((1, gen1), (2, gen2)):
            got = stub.Detokenize(pb.DetokenizeRequest(ids=gen), timeout=60).text
            want = decode(rust(gen))
            check(got == want, f"{name}: Detokenize of turn {k}'s ids equals HF's decoding"
                  + ("" if got == want else
                     f"\n  ids:    {gen}\n  server: {got!r}\n  HF:     {want!r}"))
            if rust(gen) != gen:
                print(f"     {name}: turn {k}'s ids hold invalid byte-fallback runs: the JS "
                      f"port decodes {decode(gen)!r}, the Rust crate (its rule applied) {want!r}", flush=True)
        print(f"     {name}: turn 1 {len(set(gen1))} distinct ids, text {text1!r}; "
              f"turn 2 {len(set(gen2))} distinct ids, text {text2!r}", flush=True)
        channel.close()
        check(server.stop() == 0, f"{name}: the server drains and exits 0")
        server = None
    finally:
        if server is not None:
            server.kill()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--server", required=True)
    ap.add_argument("--stubs", required=True)
    ap.add_argument("--node", default="")
    args = ap.parse_args()
    args.node = args.node or shutil.which("node") or ""
    if not args.node or not os.path.exists(args.node):
        print("SKIP: node is not installed")
        return 77
    if not os.path.isdir(os.path.join(hft.ORACLE_DIR, "node_modules", "@huggingface", "tokenizers")):
        print("SKIP: @huggingface/tokenizers is not installed "
              "(scripts/build.sh runs npm ci --prefix tests/model/hf_oracle)")
        return 77
    sys.path.insert(0, args.stubs)
    import grpc
    from retnet.v1 import retnet_pb2 as pb
    from retnet.v1 import retnet_pb2_grpc as pb_grpc

    tmp = tempfile.mkdtemp(prefix="retnet-served-tok-")
    try:
        for name, make, kind in STYLES:
            try:
                run_style(args, pb, pb_grpc, grpc, tmp, name, make, kind)
            except Exception as e:  # one style's breakage does not hide the others'
                check(False, f"{name}: {type(e).__name__}: {e}")
            if any(f.startswith(name + ":") for f in FAILURES):
                log = os.path.join(tmp, name + ".log")
                if os.path.exists(log):
                    print(f"--- {name} server log ---\n" + open(log).read()[-2000:])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{len(FAILURES)} failure(s)" if FAILURES else "all checks passed")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
