#!/usr/bin/python3
"""Tests for convert_checkpoint.py.

    /usr/bin/python3 tools/test_convert.py

Builds .pt files with torch.save from the golden-case random weights in the
shapes upstream writes them (fairseq {"model", "cfg"} with a dict /
argparse.Namespace / unimportable config object, old-style {"model",
"args"}, plain state dicts, seed state dicts), converts them with the CLI
and checks that the directory loads back with identical tensors, the
expected config.json, and the same reference forward output as the golden
case.  Also checks that inconsistent inputs are rejected with one stderr
line.  Tokenizers: an fla checkpoint's tokenizer files are carried (and
retnet-tokenize encodes the same from the output as from the source), and a
synthetic fairseq GPT-2 BPE setup (encoder.json, vocab.bpe, dict.txt built
here) becomes a vocab.json + merges.txt whose ids are the dict.txt indices.
retnet-tokenize: --tokenize, else $RETNET_TOKENIZE, else bin/ next to the
ctest working directory (BUILD/tests), else build/bin of the checkout.
Exits non-zero on any failure.
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
import textwrap

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import golden_cases  # noqa: E402
import retnet_ref  # noqa: E402
from convert_tokenizer import bytes_to_unicode  # noqa: E402  (GPT-2's byte map)
from safetensors_io import load_file  # noqa: E402

CONVERTER = os.path.join(HERE, "convert_checkpoint.py")
FAILURES = []
TOKENIZE = None  # retnet-tokenize, set by main()


def check(cond, what):
    print(f"  {'ok  ' if cond else 'FAIL'} {what}")
    if not cond:
        FAILURES.append(what)
    return cond


def run_converter(*args, env_pythonpath=None):
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if env_pythonpath:
        env["PYTHONPATH"] = env_pythonpath
    p = subprocess.run([sys.executable, CONVERTER, *args],
                       capture_output=True, text=True, env=env)
    return p.returncode, p.stdout, p.stderr


def fairseq_model_cfg(cfg):
    """fairseq-style model cfg fields (no vocab_size, plus noise fields)."""
    out = {k: v for k, v in cfg.items()
           if k not in ("family", "vocab_size")}
    out.update({"_name": "retnet_base", "dropout": 0.0,
                "max_target_positions": 2048, "checkpoint_activations": False,
                "moe_freq": 0})
    return out


def forward(case_dir, case):
    model = retnet_ref.load_model(case_dir, torch.float64)
    return model.forward(case.inputs[case.input_name])


def expect_converted(tmp, label, src, case, expect_keys, expect_cfg,
                     extra_args=(), dtype=None, pythonpath=None,
                     expect_warning=None):
    """Convert src, compare tensors/config/forward against the case."""
    print(f"{label}:")
    out = os.path.join(tmp, label)
    rc, so, se = run_converter(src, out, *extra_args,
                               env_pythonpath=pythonpath)
    if not check(rc == 0, f"converter exit 0 (stderr: {se.strip()[:300]})"):
        return
    if expect_warning is not None:
        check(expect_warning in se, f"warning mentions {expect_warning!r}")
    got = load_file(os.path.join(out, "model.safetensors"))
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    check(sorted(got) == sorted(expect_keys),
          f"tensor names ({len(got)} tensors; "
          f"missing {sorted(set(expect_keys) - set(got))[:3]}, "
          f"extra {sorted(set(got) - set(expect_keys))[:3]})")
    same = all(k in got and got[k].dtype == expect_keys[k].dtype
               and torch.equal(got[k], expect_keys[k]) for k in expect_keys)
    check(same, "tensors identical (values, dtypes, shapes)")
    check(cfg == expect_cfg,
          "config.json as expected" + ("" if cfg == expect_cfg else
                                       f": got {cfg}, want {expect_cfg}"))
    ref_dir = os.path.join(tmp, label + "_golden")
    golden_cases.write_checkpoint(case, ref_dir)
    if dtype is None:
        a, b = forward(out, case), forward(ref_dir, case)
        check(torch.equal(a, b), "reference forward identical to golden")


def test_torchscale(tmp, seed):
    case = golden_cases.build_case("torchscale", seed)
    sd = dict(case.state_dict)
    # 1. fairseq checkpoint, cfg["model"] as argparse.Namespace, with
    #    bookkeeping entries that must be dropped.
    ckpt = {"model": {**sd, "decoder.version": torch.tensor([3.0])},
            "cfg": {"common": {"seed": 1},
                    "model": argparse.Namespace(
                        **fairseq_model_cfg(case.config)),
                    "task": {"_name": "language_modeling"}},
            "optimizer_history": [{"num_updates": 10}],
            "extra_state": {"epoch": 1}, "last_optimizer_state": None}
    src = os.path.join(tmp, "ts_namespace.pt")
    torch.save(ckpt, src)
    expect_converted(tmp, "ts_fairseq_namespace", src, case, sd, case.config)

    # 2. cfg["model"] as an object of a class the converter cannot import
    #    (like omegaconf's DictConfig without omegaconf installed): a
    #    container with _content of value nodes with _val.
    mod_dir = os.path.join(tmp, "fakemods")
    os.makedirs(mod_dir, exist_ok=True)
    with open(os.path.join(mod_dir, "fake_omegaconf.py"), "w") as f:
        f.write(textwrap.dedent("""
            class ValueNode:
                def __init__(self, v):
                    self._val = v
                    self._metadata = None
            class DictConfig:
                def __init__(self, d):
                    self._content = {k: (v if isinstance(v, DictConfig)
                                         else ValueNode(v))
                                     for k, v in d.items()}
                    self._parent = None
        """))
    sys.path.insert(0, mod_dir)
    import fake_omegaconf  # noqa: E402
    dc = fake_omegaconf.DictConfig
    ckpt = {"model": sd,
            "cfg": dc({"model": dc(fairseq_model_cfg(case.config)),
                       "common": dc({"fp16": True})})}
    src = os.path.join(tmp, "ts_stubcfg.pt")
    torch.save(ckpt, src)
    sys.path.remove(mod_dir)
    expect_converted(tmp, "ts_fairseq_unimportable_cfg", src, case, sd,
                     case.config)

    # 3. plain state dict without prefix + --config JSON file (RetNetConfig).
    plain = {k[len("decoder."):]: v for k, v in sd.items()}
    src = os.path.join(tmp, "ts_plain.pt")
    torch.save(plain, src)
    cfg_path = os.path.join(tmp, "ts_config.json")
    with open(cfg_path, "w") as f:
        json.dump({k: v for k, v in case.config.items() if k != "family"},
                  f)
    case_plain = golden_cases.Case(case.name, case.config, plain,
                                   case.inputs, case.input_name)
    expect_converted(tmp, "ts_plain_config", src, case_plain, plain,
                     case.config, extra_args=["--config", cfg_path])

    # 4. fairseq cfg lacking activation_fn -> default with a warning.
    mcfg = fairseq_model_cfg(case.config)
    del mcfg["activation_fn"]
    src = os.path.join(tmp, "ts_noact.pt")
    torch.save({"model": sd, "cfg": {"model": mcfg}}, src)
    expect_converted(tmp, "ts_default_activation", src, case, sd,
                     case.config, expect_warning="activation_fn")


def test_torchscale_v1(tmp, seed):
    case = golden_cases.build_case("torchscale_v1", seed)
    # Old-style checkpoint with "args", stored in bfloat16 (buffers fp32),
    # decoder. prefix and a tied output projection sharing embed_tokens.
    sd = {}
    for k, v in case.state_dict.items():
        keep32 = k.startswith("retnet_rel_pos.")
        sd["decoder." + k] = v if keep32 else v.to(torch.bfloat16)
    sd["decoder.output_projection.weight"] = sd["decoder.embed_tokens.weight"]
    args = argparse.Namespace(**fairseq_model_cfg(case.config))
    src = os.path.join(tmp, "v1_args.pt")
    torch.save({"model": {**sd, "decoder.version": torch.tensor([3.0])},
                "args": args}, src)
    expect = {k: v for k, v in sd.items()
              if k != "decoder.output_projection.weight"}
    expect_converted(tmp, "v1_args_bf16_tied", src, case, expect,
                     case.config, dtype=torch.bfloat16)
    # The bf16 result must match a bf16-rounded golden.
    out = os.path.join(tmp, "v1_args_bf16_tied")
    rounded = {k[len("decoder."):]: v.float() for k, v in expect.items()}
    a = retnet_ref.build_model(case.config, rounded).forward(
        case.inputs["tokens"])
    b = retnet_ref.load_model(out).forward(case.inputs["tokens"])
    check(torch.equal(a, b), "bf16 checkpoint forward == bf16-rounded golden")

    # --dtype float32 casts everything back to float32.
    rc, _, se = run_converter(src, os.path.join(tmp, "v1_f32"),
                              "--dtype", "float32")
    got = load_file(os.path.join(tmp, "v1_f32", "model.safetensors"))
    check(rc == 0 and all(v.dtype == torch.float32 for v in got.values()),
          f"--dtype float32 casts all tensors ({se.strip()[:200]})")


def test_seed(tmp, seed):
    case = golden_cases.build_case("seed", seed)
    src = os.path.join(tmp, "seed.pt")
    torch.save(case.state_dict, src)
    args = {k: v for k, v in case.config.items() if k != "family"}
    args["dropout"] = 0.1
    expect_converted(tmp, "seed_args_json", src, case, case.state_dict,
                     case.config,
                     extra_args=["--seed-args", json.dumps(args)])

    case = golden_cases.build_case("seed_list", seed)
    src = os.path.join(tmp, "seed_list.pt")
    # DataParallel-style prefix and an OrderedDict, as model.state_dict().
    from collections import OrderedDict
    # Legacy (pre-zip) torch serialisation, as in older checkpoints.
    torch.save(OrderedDict(("module." + k, v)
                           for k, v in case.state_dict.items()), src,
               _use_new_zipfile_serialization=False)
    expect_converted(tmp, "seed_list_flags", src, case, case.state_dict,
                     case.config,
                     extra_args=["--num-heads", "2", "--mlp-mult", "[96, 48]",
                                 "--msr-gate-fn", "silu",
                                 "--mlp-gate-fn", "gelu"])


def test_rejections(tmp, seed):
    print("rejections:")
    case = golden_cases.build_case("torchscale", seed)
    src = os.path.join(tmp, "reject_ts.pt")
    mcfg = fairseq_model_cfg(case.config)
    torch.save({"model": case.state_dict, "cfg": {"model": mcfg}}, src)
    plain = os.path.join(tmp, "reject_plain.pt")
    torch.save({k[len("decoder."):]: v for k, v in case.state_dict.items()},
               plain)
    seed_case = golden_cases.build_case("seed", seed)
    seed_src = os.path.join(tmp, "reject_seed.pt")
    torch.save(seed_case.state_dict, seed_src)
    bad = [
        ("--config contradicting the weights",
         [src, os.path.join(tmp, "r1"), "--config",
          '{"decoder_embed_dim": 32}']),
        ("plain torchscale state dict without --config",
         [plain, os.path.join(tmp, "r2")]),
        ("seed args contradicting the weights",
         [seed_src, os.path.join(tmp, "r3"), "--num-heads", "8"]),
        ("wrong --family", [seed_src, os.path.join(tmp, "r4"),
                            "--family", "torchscale"]),
        ("missing input file", [os.path.join(tmp, "nope.pt"),
                                os.path.join(tmp, "r5")]),
        ("tied flag with a different head",
         [src, os.path.join(tmp, "r6"), "--config",
          '{"share_decoder_input_output_embed": true}']),
    ]
    for what, args in bad:
        rc, _, se = run_converter(*args)
        lines = se.strip().splitlines()
        check(rc != 0 and len(lines) == 1,
              f"{what}: exit {rc}, {len(lines)} stderr line(s): "
              f"{lines[-1][:90] if lines else ''}")


# ---------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------

BYTE_MAP = bytes_to_unicode()
# GPT-2's split regex, restricted to ASCII (\p{L} -> [A-Za-z], \p{N} ->
# [0-9]); the test texts are ASCII.
GPT2_ASCII_RE = re.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+|"""
                           r""" ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+""")
CORPUS = ["the cat sat on the mat and the dog sat on the log",
          "then the other cat ate the rat, and that was that",
          "a theme: then there, the three thin things"]
TEXTS = ["the cat sat on the mat", "then the dog ate that rat, and the cat",
         "a thin theme  there"]


def words(text):
    return [tuple(BYTE_MAP[b] for b in w.encode("utf-8"))
            for w in GPT2_ASCII_RE.findall(text)]


def train_bpe(texts, num_merges):
    """Most frequent pair first (ties: the larger pair)."""
    counts = collections.Counter(w for t in texts for w in words(t))
    ws = [[list(w), c] for w, c in counts.items()]
    merges = []
    for _ in range(num_merges):
        pairs = collections.Counter()
        for syms, c in ws:
            for a, b in zip(syms, syms[1:]):
                pairs[(a, b)] += c
        if not pairs:
            break
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        merges.append((a, b))
        for w in ws:
            w[0] = merge_word(w[0], a, b)
    return merges


def merge_word(syms, a, b):
    out, i = [], 0
    while i < len(syms):
        if i + 1 < len(syms) and syms[i] == a and syms[i + 1] == b:
            out.append(a + b)
            i += 2
        else:
            out.append(syms[i])
            i += 1
    return out


def gpt2_bpe(text, merges):
    """GPT-2's encoder.bpe: per word, merge the best-ranked pair until none
    applies.  Returns the token strings."""
    ranks = {m: i for i, m in enumerate(merges)}
    out = []
    for w in words(text):
        syms = list(w)
        while len(syms) > 1:
            best = min(zip(syms, syms[1:]),
                       key=lambda p: ranks.get(p, float("inf")))
            if best not in ranks:
                break
            syms = merge_word(syms, *best)
        out.extend(syms)
    return out


def find_tokenize(arg):
    cands = [arg, os.environ.get("RETNET_TOKENIZE"),
             os.path.join(os.getcwd(), "..", "bin", "retnet-tokenize"),
             os.path.join(HERE, "..", "build", "bin", "retnet-tokenize")]
    for c in cands:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return os.path.abspath(c)
    return None


def tokenize(directory, texts, vocab_size=None):
    """retnet-tokenize --json: (info dict, [output dicts]) or None."""
    cmd = [TOKENIZE, "--dir", directory, "--json"]
    if vocab_size is not None:
        cmd += ["--vocab-size", str(vocab_size)]
    p = subprocess.run(cmd, input="".join(json.dumps({"text": t}) + "\n"
                                          for t in texts),
                       capture_output=True, text=True)
    if not check(p.returncode == 0,
                 f"retnet-tokenize --dir {os.path.basename(directory)}"
                 f"{' --vocab-size %d' % vocab_size if vocab_size else ''} "
                 f"exit 0 ({p.stderr.strip()[:200]})"):
        return None
    lines = [json.loads(x) for x in p.stdout.splitlines()]
    return lines[0], lines[1:]


def same_bytes(a, b):
    with open(a, "rb") as fa, open(b, "rb") as fb:
        return fa.read() == fb.read()


def test_tokenizer_carry(tmp, seed):
    print("tokenizer files carried (fla):")
    case = golden_cases.build_case("fla", seed)
    src = os.path.join(tmp, "fla_src")
    os.makedirs(os.path.join(src, "sub"))
    torch.save(case.state_dict, os.path.join(src, "model.pt"))
    with open(os.path.join(src, "config.json"), "w") as f:
        json.dump(case.config, f)
    merges = train_bpe(CORPUS, 30)
    vocab = {}
    for c in sorted(BYTE_MAP.values()):
        vocab[c] = len(vocab)
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    eot = len(vocab)
    vocab["<|endoftext|>"] = eot
    check(eot < case.config["vocab_size"], f"test tokenizer fits ({eot})")
    tj = {"version": "1.0", "truncation": None, "padding": None,
          "added_tokens": [{"id": eot, "content": "<|endoftext|>",
                            "single_word": False, "lstrip": False,
                            "rstrip": False, "normalized": False,
                            "special": True}],
          "normalizer": None,
          "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False,
                            "trim_offsets": True, "use_regex": True},
          "post_processor": None,
          "decoder": {"type": "ByteLevel", "add_prefix_space": True,
                      "trim_offsets": True, "use_regex": True},
          "model": {"type": "BPE", "dropout": None, "unk_token": None,
                    "continuing_subword_prefix": None,
                    "end_of_word_suffix": None, "fuse_unk": False,
                    "byte_fallback": False, "ignore_merges": False,
                    "vocab": vocab,
                    "merges": [f"{a} {b}" for a, b in merges]}}
    files = {"tokenizer.json": tj,
             "tokenizer_config.json": {"bos_token": "<|endoftext|>",
                                       "eos_token": "<|endoftext|>",
                                       "add_bos_token": False},
             "generation_config.json": {"eos_token_id": eot,
                                        "bos_token_id": eot}}
    for name, obj in files.items():
        with open(os.path.join(src, name), "w", encoding="utf-8") as f:
            json.dump(obj, f, ensure_ascii=False)
    # A symlink that stays inside the source is carried as a file; one
    # that leads out of it is not followed.
    with open(os.path.join(src, "sub", "stm.json"), "w") as f:
        json.dump({"eos_token": "<|endoftext|>"}, f)
    os.symlink(os.path.join("sub", "stm.json"),
               os.path.join(src, "special_tokens_map.json"))
    outside = os.path.join(tmp, "outside_secret")
    with open(outside, "w") as f:
        f.write("not a tokenizer\n")
    os.symlink(outside, os.path.join(src, "tokenizer.model"))

    out = os.path.join(tmp, "fla_out")
    expect_cfg = dict(case.config, family="fla")
    rc, so, se = run_converter(os.path.join(src, "model.pt"), out,
                               "--config", os.path.join(src, "config.json"))
    if not check(rc == 0, f"converter exit 0 (stderr: {se.strip()[:300]})"):
        return
    with open(os.path.join(out, "config.json")) as f:
        check(json.load(f) == expect_cfg, "config.json as expected")
    for name in list(files) + ["special_tokens_map.json"]:
        dst = os.path.join(out, name)
        check(os.path.isfile(dst) and not os.path.islink(dst) and
              same_bytes(dst, os.path.join(src, name)),
              f"{name} carried as a regular file, same bytes")
    check(not os.path.lexists(os.path.join(out, "tokenizer.model")),
          "symlink out of the source not carried")
    check("tokenizer.model" in se and "outside" in se,
          f"skipped symlink reported on stderr: {se.strip()[:160]}")
    check("carried" in so and "tokenizer.json" in so,
          f"carried files listed on stdout: "
          f"{[x for x in so.splitlines() if 'carried' in x][:1]}")
    if TOKENIZE is None:
        check(False, "retnet-tokenize found (pass --tokenize)")
        return
    a = tokenize(src, TEXTS)
    b = tokenize(out, TEXTS)
    c = tokenize(out, TEXTS, vocab_size=case.config["vocab_size"])
    if a and b and c:
        check(a == b, "retnet-tokenize --dir OUT == --dir SRC (ids, decode)")
        check(c[1] == a[1], "LoadTokenizer selection on OUT: same ids")
        ids = [i for r in b[1] for i in r["ids"]]
        check(any(i >= 256 for i in ids) and
              [r["decode"] for r in b[1]] == TEXTS,
              "merged tokens used and the texts decode back")

    # --tokenizer-dir: a state dict in a directory of its own.
    bare = os.path.join(tmp, "fla_bare")
    os.makedirs(bare)
    shutil.copy(os.path.join(src, "model.pt"), bare)
    out2 = os.path.join(tmp, "fla_out2")
    rc, so, se = run_converter(os.path.join(bare, "model.pt"), out2,
                               "--config", os.path.join(src, "config.json"),
                               "--tokenizer-dir", src)
    check(rc == 0 and same_bytes(os.path.join(out2, "tokenizer.json"),
                                 os.path.join(src, "tokenizer.json")),
          f"--tokenizer-dir carries tokenizer.json ({se.strip()[:200]})")
    rc, so, se = run_converter(os.path.join(bare, "model.pt"),
                               os.path.join(tmp, "fla_out3"),
                               "--config", os.path.join(src, "config.json"))
    check(rc == 0 and "no tokenizer files" in so and not os.path.lexists(
        os.path.join(tmp, "fla_out3", "tokenizer.json")),
          "no tokenizer files: none written, and said so")
    rc, _, se = run_converter(os.path.join(bare, "model.pt"),
                              os.path.join(tmp, "fla_out4"),
                              "--config", os.path.join(src, "config.json"),
                              "--tokenizer-dir", os.path.join(tmp, "nope"))
    check(rc != 0 and "--tokenizer-dir" in se and
          not os.path.exists(os.path.join(tmp, "fla_out4")),
          f"missing --tokenizer-dir refused before writing: {se.strip()}")


def make_fairseq(tmp, seed):
    """encoder.json / vocab.bpe (GPT-2 style: 256 byte symbols, merges,
    <|endoftext|>) and the dict.txt symbols in fairseq order."""
    merges = train_bpe(CORPUS, 40)
    encoder = {}
    for b in range(256):  # GPT-2 ids are not in dict.txt order
        encoder[BYTE_MAP[b]] = len(encoder)
    for a, b in merges:
        encoder.setdefault(a + b, len(encoder))
    encoder["<|endoftext|>"] = len(encoder)
    gpt2 = os.path.join(tmp, "gpt2")
    os.makedirs(gpt2)
    with open(os.path.join(gpt2, "encoder.json"), "w",
              encoding="utf-8") as f:
        json.dump(encoder, f, ensure_ascii=False)
    with open(os.path.join(gpt2, "vocab.bpe"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for a, b in merges:
            f.write(f"{a} {b}\n")
    # dict.txt: the corpus's tokens, less two merge results that no other
    # merge builds on and the texts never produce (fairseq keeps only the
    # tokens of its training data), in a shuffled order with counts.
    used = {t for text in CORPUS + TEXTS for t in gpt2_bpe(text, merges)}
    parts = {x for a, b in merges for x in (a, b)}
    text_tokens = {t for text in TEXTS for t in gpt2_bpe(text, merges)}
    droppable = [a + b for a, b in merges
                 if a + b not in parts and a + b not in text_tokens]
    dropped = set(droppable[-2:])
    chars = {c for text in CORPUS + TEXTS for w in words(text) for c in w}
    dict_tokens = sorted((chars | used | {a + b for a, b in merges})
                         - dropped)
    random.Random(seed).shuffle(dict_tokens)
    return encoder, merges, dict_tokens, dropped, gpt2


def write_dict(path, lines):
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(x + "\n" for x in lines))


def test_fairseq_tokenizer(tmp, seed):
    print("fairseq GPT-2 BPE dictionary:")
    case = golden_cases.build_case("torchscale", seed)
    encoder, merges, dict_tokens, dropped, gpt2 = make_fairseq(tmp, seed)
    dict_lines = [f"{encoder[t]} {1000 - i}" for i, t in
                  enumerate(dict_tokens)]
    dict_lines += ["madeupword0000 0", "madeupword0001 0"]
    check(len(dropped) == 2 and 4 + len(dict_lines) <= case.config[
        "vocab_size"], f"test setup: {len(dict_lines)} dict entries, "
          f"dropped {sorted(dropped)}")
    src = os.path.join(tmp, "fs_src")
    os.makedirs(src)
    ckpt = os.path.join(src, "checkpoint_best.pt")
    torch.save({"model": case.state_dict,
                "cfg": {"model": fairseq_model_cfg(case.config)}}, ckpt)
    dict_path = os.path.join(src, "dict.txt")
    write_dict(dict_path, dict_lines)
    enc_path = os.path.join(gpt2, "encoder.json")
    bpe_path = os.path.join(gpt2, "vocab.bpe")
    out = os.path.join(tmp, "fs_out")
    rc, so, se = run_converter(ckpt, out, "--fairseq-dict", dict_path,
                               "--gpt2-encoder", enc_path,
                               "--gpt2-bpe", bpe_path)
    if not check(rc == 0, f"converter exit 0 (stderr: {se.strip()[:300]})"):
        return
    want_vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for i, t in enumerate(dict_tokens):
        want_vocab[t] = i + 4
    n = len(dict_tokens) + 4
    want_vocab.update({"madeupword0000": n, "madeupword0001": n + 1})
    with open(os.path.join(out, "vocab.json"), encoding="utf-8") as f:
        got_vocab = json.load(f)
    check(got_vocab == want_vocab, "vocab.json: token -> fairseq index")
    with open(os.path.join(out, "merges.txt"), encoding="utf-8") as f:
        got_merges = f.read().splitlines()
    want_merges = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges
                                       if a + b not in dropped]
    check(got_merges == want_merges,
          f"merges.txt: header and the {len(want_merges) - 1} merges into "
          f"the vocabulary, in order ({len(got_merges) - 1} written)")
    with open(os.path.join(out, "tokenizer_config.json")) as f:
        tc = json.load(f)
    check(tc.get("bos_token") == "<s>" and tc.get("eos_token") == "</s>"
          and tc.get("add_bos_token") is False,
          f"tokenizer_config.json: {tc}")
    check("byte symbols" in se, "missing byte symbols warned about")
    check("fairseq" in so and "dict.txt" in so,
          f"stdout reports the dictionary: "
          f"{[x for x in so.splitlines() if 'tokenizer' in x][:1]}")
    # What fairseq computes: GPT-2 ids of the text's BPE tokens, then the
    # dict.txt line of each id + 4.
    dict_index = {int(line.split()[0]): i + 4
                  for i, line in enumerate(dict_lines)
                  if line.split()[0].isdigit()}
    want = []
    for text in TEXTS:
        toks = gpt2_bpe(text, merges)
        check(all(encoder[t] in dict_index for t in toks),
              f"test setup: every token of {text!r} is in dict.txt")
        want.append([dict_index[encoder[t]] for t in toks])
    if TOKENIZE is None:
        check(False, "retnet-tokenize found (pass --tokenize)")
        return
    for vs in (None, case.config["vocab_size"]):
        r = tokenize(out, TEXTS, vs)
        if r:
            info, rows = r
            check([x.get("ids") for x in rows] == want,
                  f"ids are the fairseq indices (vocab_size={vs}): "
                  f"{rows[0].get('ids')} vs {want[0]}")
            check([x.get("decode") for x in rows] == TEXTS,
                  "the texts decode back")
            check(info.get("bos_id") == 0 and info.get("eos_id") == 2,
                  f"bos 0, eos 2: {info}")

    # Detected in the checkpoint's directory, without flags.
    det = os.path.join(tmp, "fs_detect")
    os.makedirs(det)
    for p in (ckpt, dict_path, enc_path, bpe_path):
        shutil.copy(p, det)
    rc, so, se = run_converter(os.path.join(det, "checkpoint_best.pt"),
                               os.path.join(tmp, "fs_detect_out"))
    check(rc == 0 and all(same_bytes(os.path.join(out, n), os.path.join(
        tmp, "fs_detect_out", n)) for n in ("vocab.json", "merges.txt",
                                            "tokenizer_config.json")),
          f"dict.txt + encoder.json + vocab.bpe detected ({se.strip()[:200]})")

    # Errors: named line, nonzero exit, one stderr line, nothing written.
    bad_id = max(encoder.values()) + 1000
    cases = [
        ("dict id missing from encoder.json",
         dict_lines[:2] + [f"{bad_id} 7"] + dict_lines[2:], "line 3",
         str(bad_id)),
        ("unknown dict symbol", dict_lines[:4] + ["hello 3"], "line 5",
         "hello"),
        ("malformed dict line", dict_lines[:1] + ["464"], "line 2", "COUNT"),
        ("duplicate dict entry", dict_lines + dict_lines[:1],
         f"line {len(dict_lines) + 1}", "duplicate"),
        ("dict larger than the model's vocabulary",
         [f"{i} 1" for i in sorted(encoder.values())], "vocabulary",
         str(case.config["vocab_size"])),
    ]
    for k, (what, lines, where, word) in enumerate(cases):
        d = os.path.join(tmp, f"fs_bad{k}")
        os.makedirs(d)
        write_dict(os.path.join(d, "dict.txt"), lines)
        o = os.path.join(tmp, f"fs_bad{k}_out")
        rc, _, se = run_converter(ckpt, o, "--fairseq-dict",
                                  os.path.join(d, "dict.txt"),
                                  "--gpt2-encoder", enc_path,
                                  "--gpt2-bpe", bpe_path)
        lines_err = se.strip().splitlines()
        check(rc != 0 and len(lines_err) == 1 and where in se and word in se
              and not os.path.exists(o),
              f"{what}: exit {rc}, {len(lines_err)} line(s): "
              f"{lines_err[-1][:150] if lines_err else ''}")
    rc, _, se = run_converter(ckpt, os.path.join(tmp, "fs_noenc"),
                              "--fairseq-dict", dict_path)
    check(rc != 0 and "--gpt2-encoder" in se,
          f"--fairseq-dict without encoder.json: {se.strip()[:150]}")


def main():
    global TOKENIZE
    ap = argparse.ArgumentParser(description="convert_checkpoint.py tests")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", help="keep the work files in this directory")
    ap.add_argument("--tokenize", help="retnet-tokenize binary")
    args = ap.parse_args()
    TOKENIZE = find_tokenize(args.tokenize)
    print(f"retnet-tokenize: {TOKENIZE}")
    with tempfile.TemporaryDirectory(prefix="test_convert.") as tmp:
        tmp = args.keep or tmp
        os.makedirs(tmp, exist_ok=True)
        test_torchscale(tmp, args.seed)
        test_torchscale_v1(tmp, args.seed)
        test_seed(tmp, args.seed)
        test_rejections(tmp, args.seed)
        test_tokenizer_carry(tmp, args.seed)
        test_fairseq_tokenizer(tmp, args.seed)
    if FAILURES:
        print(f"test_convert: {len(FAILURES)} FAILED")
        return 1
    print("test_convert: all passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
