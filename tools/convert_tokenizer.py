"""Tokenizer side of convert_checkpoint.py: the files that let a converted
checkpoint serve text.

Two sources, planned first (every check done before anything is written) and
then written next to config.json / model.safetensors:

  * carried files: tokenizer.json, tokenizer_config.json,
    special_tokens_map.json, generation_config.json, vocab.json, merges.txt
    and tokenizer.model, copied from the checkpoint's directory (or
    --tokenizer-dir).  Only regular files are copied; a symlink is followed
    only where it resolves inside that directory.  Every file carried and
    every candidate skipped is reported.

  * a fairseq / torchscale GPT-2 BPE vocabulary: dict.txt (4 specials <s>,
    <pad>, </s>, <unk> at 0..3, then "TOKEN COUNT [#fairseq:overwrite]" per
    line, TOKEN a GPT-2 id as a decimal string or a symbol such as
    madeupword0000 or <mask>) over GPT-2's encoder.json and vocab.bpe,
    rewritten as vocab.json (GPT-2 token string -> fairseq index),
    merges.txt (GPT-2's merges among tokens of that vocabulary, in order,
    header kept) and tokenizer_config.json.

Limits of the fairseq rewrite: text is tokenized with the merges among
dictionary tokens only, so it matches fairseq (full GPT-2 BPE, then dict
lookup, unknown -> <unk>) whenever GPT-2's tokens for the text are all in
the dictionary and reachable through dictionary tokens; bytes whose base
symbol is not in the dictionary are dropped rather than mapped to <unk>.
Both are counted in a warning when they can occur.
"""

import json
import os
import re
import stat

# Load order of model/tokenizer.cc LoadTokenizer: the first present wins.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "generation_config.json",
                   "vocab.json", "merges.txt", "tokenizer.model")
# Files that select a tokenizer (the rest are settings around it).
TOKENIZER_MODELS = ("tokenizer.json", "vocab.json", "merges.txt",
                    "tokenizer.model")
FAIRSEQ_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")
# Non-id dict.txt entries fairseq writes: the padding symbols of
# Dictionary.pad_to_multiple_ and bracketed specials such as <mask>.
_KNOWN_SYMBOL = re.compile(r"madeupword[0-9]+|<[^\s<>]+>")
_MAX_FILE = 1 << 30


class TokenizerError(Exception):
    pass


def bytes_to_unicode():
    """GPT-2's byte -> printable character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + \
        list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def _inside(path, root):
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _resolve_in(directory, name):
    """(real path, None) for DIR/NAME when it is a regular file inside DIR
    (symlinks followed only within DIR); (None, reason) when it exists but
    may not be read; (None, None) when absent."""
    path = os.path.join(directory, name)
    if not os.path.lexists(path):
        return None, None
    root = os.path.realpath(directory)
    real = os.path.realpath(path)
    if not _inside(real, root):
        return None, f"a symlink to {real}, outside {root}"
    try:
        st = os.stat(real)
    except OSError as e:
        return None, f"cannot stat: {e.strerror}"
    if not stat.S_ISREG(st.st_mode):
        return None, "not a regular file"
    if st.st_size > _MAX_FILE:
        return None, f"{st.st_size} bytes, over the {_MAX_FILE} limit"
    return real, None


def _read_bytes(real):
    # O_NONBLOCK: a file swapped for a FIFO after the check cannot block.
    fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK |
                 getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise TokenizerError(f"{real}: not a regular file")
        return f.read(_MAX_FILE + 1)


def _read_input(path, what):
    """An explicitly named input file (a symlink anywhere is fine here)."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise TokenizerError(f"{what} {path}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise TokenizerError(f"{what} {path}: not a regular file")
    try:
        data = _read_bytes(os.path.realpath(path))
        return data.decode("utf-8")
    except OSError as e:
        raise TokenizerError(f"{what} {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise TokenizerError(f"{what} {path}: not UTF-8 ({e})") from None


class Plan:
    """What to write: files copied (name -> real source path) and files
    generated (name -> text), plus report lines."""

    def __init__(self, source_dir):
        self.source_dir = source_dir
        self.copy = {}
        self.generate = {}
        self.skipped = []      # (name, reason)
        self.notes = []        # printed on stdout
        self.warnings = []     # printed on stderr
        self.vocab_size = None  # ids the generated vocabulary needs

    def names(self):
        return sorted(set(self.copy) | set(self.generate))


# ---------------------------------------------------------------------------
# fairseq dict.txt over GPT-2 encoder.json + vocab.bpe
# ---------------------------------------------------------------------------

def parse_fairseq_dict(text, path, id_to_token):
    """dict.txt -> list of symbols by fairseq index (specials first);
    a GPT-2 id entry becomes its GPT-2 token string."""
    symbols = list(FAIRSEQ_SPECIALS)
    index = {s: i for i, s in enumerate(symbols)}
    for line_no, raw in enumerate(text.splitlines(), 1):
        where = f"{path} line {line_no} ({raw.strip()[:40]!r})"
        line = raw.rstrip()
        overwrite = False
        parts = line.rsplit(" ", 1)
        if len(parts) == 2 and parts[1] == "#fairseq:overwrite":
            overwrite = True
            parts = parts[0].rsplit(" ", 1)
        if len(parts) != 2 or not parts[0] or \
                not re.fullmatch(r"[0-9]+", parts[1]):
            raise TokenizerError(f"{where}: expected 'TOKEN COUNT' "
                                 "(fairseq dict format)")
        entry = parts[0]
        if re.fullmatch(r"[0-9]+", entry):
            gpt2_id = int(entry)
            if gpt2_id not in id_to_token:
                raise TokenizerError(f"{where}: GPT-2 id {gpt2_id} is not "
                                     "in encoder.json")
            token = id_to_token[gpt2_id]
        elif _KNOWN_SYMBOL.fullmatch(entry):
            token = entry
        else:
            raise TokenizerError(f"{where}: {entry!r} is neither a GPT-2 id "
                                 "(decimal) nor a known fairseq symbol "
                                 "(madeupwordNNNN, <name>)")
        if token in index and not overwrite:
            raise TokenizerError(f"{where}: duplicate entry {entry!r} "
                                 f"(token {token!r} already at index "
                                 f"{index[token]})")
        index[token] = len(symbols)
        symbols.append(token)
    return symbols, index


def fairseq_gpt2_files(dict_path, encoder_path, bpe_path):
    """-> (vocab, merges.txt text, tokenizer_config, warnings, merges
    kept)."""
    try:
        encoder = json.loads(_read_input(encoder_path, "--gpt2-encoder"))
    except json.JSONDecodeError as e:
        raise TokenizerError(f"--gpt2-encoder {encoder_path}: not JSON: "
                             f"{e}") from None
    if not isinstance(encoder, dict) or not all(
            isinstance(v, int) and not isinstance(v, bool)
            for v in encoder.values()):
        raise TokenizerError(f"--gpt2-encoder {encoder_path}: expected a "
                             "JSON object of token -> integer id")
    id_to_token = {}
    for tok, i in encoder.items():
        if i in id_to_token:
            raise TokenizerError(f"--gpt2-encoder {encoder_path}: id {i} "
                                 f"for both {id_to_token[i]!r} and {tok!r}")
        id_to_token[i] = tok
    symbols, index = parse_fairseq_dict(
        _read_input(dict_path, "--fairseq-dict"), dict_path, id_to_token)
    vocab = dict(sorted(index.items(), key=lambda kv: kv[1]))

    bpe_lines = _read_input(bpe_path, "--gpt2-bpe").splitlines()
    out = []
    kept = unreachable = 0
    for line_no, line in enumerate(bpe_lines, 1):
        if line_no == 1 and line.startswith("#version"):
            out.append(line)
            continue
        if not line.strip():
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise TokenizerError(f"--gpt2-bpe {bpe_path} line {line_no}: "
                                 "expected two tokens separated by a space")
        a, b = parts
        merged = a + b
        if merged not in vocab:
            continue
        # The server's loader needs both parts in the vocabulary too.
        if a in vocab and b in vocab:
            out.append(line)
            kept += 1
        else:
            unreachable += 1
    warnings = []
    if unreachable:
        warnings.append(f"{unreachable} GPT-2 merges produce a dict.txt "
                        "token from a part that is not in dict.txt; those "
                        "merges are left out, so text where GPT-2 BPE goes "
                        "through them tokenizes differently from fairseq")
    missing = [c for c in bytes_to_unicode().values() if c not in vocab]
    if missing:
        warnings.append(f"{len(missing)} of the 256 byte symbols are not in "
                        "dict.txt: the served tokenizer drops those bytes "
                        "where fairseq would give <unk>")
    # fairseq LM prompts do not start with <s>, but generation ends at </s>.
    tok_config = {"bos_token": "<s>", "eos_token": "</s>",
                  "unk_token": "<unk>", "pad_token": "<pad>",
                  "add_bos_token": False, "tokenizer_class": "GPT2Tokenizer"}
    merges_text = "\n".join(out) + "\n"
    return vocab, merges_text, tok_config, warnings, kept


def _find_fairseq(plan, directory, fairseq_dict, gpt2_encoder, gpt2_bpe):
    """The three fairseq inputs: explicit paths, else the same names next
    to dict.txt or in DIRECTORY.  None when not asked for and not all
    present in DIRECTORY."""
    names = {"dict": "dict.txt", "encoder": "encoder.json",
             "bpe": "vocab.bpe"}
    given = {"dict": fairseq_dict, "encoder": gpt2_encoder, "bpe": gpt2_bpe}
    explicit = any(v is not None for v in given.values())
    found = {}
    for key, name in names.items():
        if given[key] is not None:
            found[key] = given[key]
            continue
        dirs = [directory]
        if key != "dict" and fairseq_dict is not None:
            dirs.insert(0, os.path.dirname(os.path.abspath(fairseq_dict)))
        for d in dirs:
            if d is None:
                continue
            real, reason = _resolve_in(d, name)
            if real is not None:
                found[key] = real
                break
            if reason is not None and explicit:
                raise TokenizerError(f"{os.path.join(d, name)}: {reason}")
    if explicit:
        flags = {"dict": "--fairseq-dict", "encoder": "--gpt2-encoder",
                 "bpe": "--gpt2-bpe"}
        lacking = [flags[k] for k in names if k not in found]
        if lacking:
            raise TokenizerError(f"a fairseq GPT-2 tokenizer needs "
                                 f"{' '.join(lacking)} (no "
                                 f"{', '.join(names[k] for k in names if k not in found)} "
                                 "found next to dict.txt or in "
                                 f"{directory})")
        return found
    if len(found) == 3:
        return found
    if "dict" in found:
        plan.notes.append(f"{found['dict']} found without "
                          f"{' and '.join(names[k] for k in ('encoder', 'bpe') if k not in found)}: "
                          "pass --gpt2-encoder encoder.json --gpt2-bpe "
                          "vocab.bpe to carry its GPT-2 BPE tokenizer")
    return None


def plan_tokenizer(source_dir, tokenizer_dir=None, fairseq_dict=None,
                   gpt2_encoder=None, gpt2_bpe=None):
    """Decides (and validates) every tokenizer file of the output."""
    explicit_dir = tokenizer_dir is not None
    directory = tokenizer_dir if explicit_dir else source_dir
    if explicit_dir and not os.path.isdir(directory):
        raise TokenizerError(f"--tokenizer-dir {directory}: not a directory")
    plan = Plan(directory)
    present = {}
    for name in TOKENIZER_FILES:
        real, reason = _resolve_in(directory, name)
        if real is not None:
            present[name] = real
        elif reason is not None:
            plan.skipped.append((name, reason))
    fs = _find_fairseq(plan, directory, fairseq_dict, gpt2_encoder, gpt2_bpe)
    if fs is not None and any(n in present for n in TOKENIZER_MODELS) and \
            fairseq_dict is None and gpt2_encoder is None and gpt2_bpe is None:
        plan.notes.append(
            f"{fs['dict']} ignored: {directory} already has "
            f"{', '.join(n for n in TOKENIZER_MODELS if n in present)} "
            "(pass --fairseq-dict to build the tokenizer from dict.txt)")
        fs = None
    if fs is not None:
        vocab, merges, tok_config, warnings, kept = fairseq_gpt2_files(
            fs["dict"], fs["encoder"], fs["bpe"])
        plan.generate["vocab.json"] = json.dumps(
            vocab, ensure_ascii=False, indent=0) + "\n"
        plan.generate["merges.txt"] = merges
        plan.generate["tokenizer_config.json"] = json.dumps(
            tok_config, indent=2) + "\n"
        plan.vocab_size = max(vocab.values()) + 1
        plan.warnings.extend(warnings)
        plan.notes.append(
            f"tokenizer: fairseq GPT-2 BPE from {fs['dict']} "
            f"({len(vocab)} tokens, ids 0..{plan.vocab_size - 1}; "
            f"{kept} merges kept) -> vocab.json, merges.txt, "
            "tokenizer_config.json")
        # The generated files replace these (tokenizer.json and
        # tokenizer.model would also take precedence or confuse).
        for name in ("tokenizer.json", "vocab.json", "merges.txt",
                     "tokenizer_config.json", "tokenizer.model"):
            if name in present:
                del present[name]
                plan.skipped.append((name, "replaced by the tokenizer "
                                     "built from dict.txt"))
    plan.copy = present
    if explicit_dir and not plan.copy and not plan.generate:
        raise TokenizerError(f"--tokenizer-dir {directory}: none of "
                             f"{', '.join(TOKENIZER_FILES)}")
    return plan


def check_vocab_size(plan, model_vocab):
    if plan.vocab_size is not None and model_vocab is not None and \
            plan.vocab_size > model_vocab:
        raise TokenizerError(f"dict.txt has {plan.vocab_size} entries "
                             f"(with the 4 specials) but the model's "
                             f"vocabulary is {model_vocab}")


def write_tokenizer(plan, out_dir):
    """Writes the planned files; returns report lines for stdout."""
    lines = list(plan.notes)
    out_real = os.path.realpath(out_dir)
    carried = []
    for name, real in sorted(plan.copy.items()):
        dst = os.path.join(out_dir, name)
        if os.path.realpath(dst) == real or (
                os.path.exists(dst) and os.path.samefile(dst, real)):
            carried.append(name + " (already there)")
            continue
        data = _read_bytes(real)
        if os.path.islink(dst):
            os.unlink(dst)
        with open(dst, "wb") as f:
            f.write(data)
        carried.append(name)
    for name, text in sorted(plan.generate.items()):
        dst = os.path.join(out_dir, name)
        if os.path.islink(dst):
            os.unlink(dst)
        with open(dst, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
    if carried:
        lines.append(f"tokenizer: carried from {plan.source_dir}: "
                     f"{', '.join(carried)}")
    elif not plan.generate:
        lines.append(f"tokenizer: no tokenizer files in {plan.source_dir} "
                     "(the server falls back to byte-level or ids-only)")
    # A tokenizer file already in OUT_DIR that this run did not write and
    # that the server reads before the one written would shadow it.
    written = set(plan.copy) | set(plan.generate)
    order = [("tokenizer.json",), ("vocab.json", "merges.txt"),
             ("tokenizer.model",)]
    for rank, group in enumerate(order):
        if written & set(group):
            for earlier in order[:rank]:
                for name in earlier:
                    if name not in written and os.path.lexists(
                            os.path.join(out_real, name)):
                        plan.warnings.append(
                            f"{os.path.join(out_dir, name)} (not from this "
                            "conversion) is loaded before the "
                            f"{'/'.join(sorted(written & set(group)))} "
                            "written now; remove it")
            break
    return lines
