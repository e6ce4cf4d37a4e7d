"""A checkpoint-corruption corpus through retnet-forward and retnet-server --checkpoint.

usage: test_corrupt_checkpoints.py --forward build/bin/retnet-forward --server build/bin/retnet-server
                                   --checkpoint model/default [--jobs 2]

From the valid built-in checkpoint it derives truncations of model.safetensors, header-length and
header-JSON mutations (holes, overlaps, bad dtypes and shapes, shapes that overflow), config.json
mutations with absurd sizes, sharded checkpoints with a bad index or shard, and special files (a
FIFO, /dev/zero, a directory) in place of config.json, the weights, a shard and the tokenizer.
Every case runs through retnet-forward (and a representative subset through retnet-server) under
an address-space limit (RLIMIT_AS, so a multi-GB allocation fails visibly instead of swapping) and
a time limit; each must exit with status 1 (not a signal, not a timeout) after one error line on
stderr that names the problem, with a modest peak RSS. The unmodified checkpoint must still load
in both binaries (exit 0), so the corpus tests the checks, not a broken tool.
"""

import argparse
import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from harness import ServerProcess, check, finish  # noqa: E402

TIMEOUT_S = 20
ADDRESS_SPACE = 3 << 30  # LibTorch + gRPC start in well under this; a multi-GB buffer does not fit
MAX_RSS_MB = 1024


def limit_address_space():
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


def run(cmd, scratch):
    """(exit status or -signal, stderr text, seconds, peak RSS in MB of this process); the status
    is None when the time limit killed it."""
    t0 = time.monotonic()
    with tempfile.TemporaryFile(dir=scratch) as err:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                preexec_fn=limit_address_space)
        timed_out = threading.Event()

        def kill():
            timed_out.set()
            proc.kill()
        timer = threading.Timer(TIMEOUT_S, kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage
        finally:
            timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        text = err.read().decode(errors="replace")
    rc = None if timed_out.is_set() else proc.returncode
    return rc, text, time.monotonic() - t0, usage.ru_maxrss / 1024.0


def read_st(path):
    data = open(path, "rb").read()
    n = struct.unpack("<Q", data[:8])[0]
    return n, json.loads(data[8:8 + n]), data[8 + n:]


def write_st(path, header, body, header_len=None, pad_to=None):
    text = json.dumps(header, separators=(",", ":")).encode()
    if pad_to is not None:
        text = text.ljust(pad_to, b" ")
    else:
        text += b" " * (-(len(text) + 8) % 8)
    n = len(text) if header_len is None else header_len
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", n) + text + body)


class Case:
    def __init__(self, name, d, server, needles):
        self.name, self.dir, self.server, self.needles = name, d, server, needles


class Corpus:
    """Each case is a directory of symlinks to the valid checkpoint with one entry replaced."""

    def __init__(self, src, root):
        self.src, self.root = src, root
        self.cases = []
        self.n_header, self.header, self.body = read_st(os.path.join(src, "model.safetensors"))
        self.config = json.load(open(os.path.join(src, "config.json")))
        self.names = sorted(k for k in self.header if k != "__metadata__")
        # The tensor stored first, and one 2-D non-square tensor.
        self.first = min(self.names, key=lambda k: self.header[k]["data_offsets"][0])
        self.matrix = next(k for k in self.names if len(self.header[k]["shape"]) == 2
                           and self.header[k]["shape"][0] != self.header[k]["shape"][1])

    def new(self, name, needles, server=False, files=("config.json", "model.safetensors")):
        d = os.path.join(self.root, f"{len(self.cases):02d}-{name}")
        os.makedirs(d)
        for f in files:
            os.symlink(os.path.abspath(os.path.join(self.src, f)), os.path.join(d, f))
        self.cases.append(Case(name, d, server, needles))
        return d

    def replace(self, d, name):
        p = os.path.join(d, name)
        if os.path.lexists(p):
            os.unlink(p)
        return p

    def weights(self, name, data, needles, server=False):
        d = self.new(name, ["model.safetensors"] + needles, server)
        with open(self.replace(d, "model.safetensors"), "wb") as f:
            f.write(data)

    def header_case(self, name, mutate, needles, server=False):
        h = json.loads(json.dumps(self.header))
        mutate(h)
        d = self.new(name, ["model.safetensors"] + needles, server)
        write_st(self.replace(d, "model.safetensors"), h, self.body, pad_to=self.n_header)

    def config_case(self, name, mutate, needles, server=False, file="config.json"):
        """`file`: the file the error must name (the weights when the config is self-consistent)."""
        c = dict(self.config)
        text = mutate(c)
        d = self.new(name, [file] + needles, server)
        with open(self.replace(d, "config.json"), "w") as f:
            f.write(text if isinstance(text, str) else json.dumps(c))

    def sharded(self, name, needles, server=False):
        """Two shards + an index, all valid; the caller then breaks one piece."""
        d = self.new(name, needles, server, files=("config.json",))
        half = len(self.names) // 2
        weight_map = {}
        for i, part in enumerate((self.names[:half], self.names[half:])):
            shard = f"model-0000{i + 1}-of-00002.safetensors"
            header, body = {}, b""
            for k in part:
                b, e = self.header[k]["data_offsets"]
                header[k] = dict(self.header[k], data_offsets=[len(body), len(body) + e - b])
                body += self.body[b:e]
                weight_map[k] = shard
            write_st(os.path.join(d, shard), header, body)
        with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f)
        return d, weight_map

    def build(self):
        raw = open(os.path.join(self.src, "model.safetensors"), "rb").read()
        n, first, names = self.n_header, self.first, self.names
        for cut in (0, 4, 8, 9, 8 + n // 2, 8 + n - 1, 8 + n, 8 + n + len(self.body) // 2, len(raw) - 1):
            self.weights(f"truncated-at-{cut}", raw[:cut], ["truncated" if cut < 8 + n else "data"],
                         server=cut in (0, len(raw) - 1))
        for delta, srv in ((-1, True), (1, False), (-8, False), (8, False)):
            self.weights(f"header-length{delta:+d}", struct.pack("<Q", n + delta) + raw[8:], ["header"], server=srv)
        for value, needle in ((0, "not valid JSON"), (1 << 40, "exceeds the limit"),
                              ((1 << 64) - 1, "exceeds the limit"), (100 << 20, "truncated")):
            self.weights(f"header-length-{value}", struct.pack("<Q", value) + raw[8:], [needle])
        self.weights("header-not-json", raw[:8] + b"x" + raw[9:], ["not valid JSON"])
        self.weights("header-trailing-newline", raw[:8 + n - 1] + b"\n" + raw[8 + n:], ["not valid JSON"])
        self.weights("trailing-bytes", raw + b"\0" * 16, ["tensors cover"], server=True)

        def shift(h):
            b, e = h[first]["data_offsets"]
            h[first]["data_offsets"] = [b + 4, e + 4]

        def size(k):
            b, e = self.header[k]["data_offsets"]
            return e - b

        def swap(h):  # two tensors of different sizes swap offsets: their byte counts no longer match
            a = names[0]
            b = next(k for k in names if size(k) != size(a))
            h[a]["data_offsets"], h[b]["data_offsets"] = h[b]["data_offsets"], h[a]["data_offsets"]

        def overlap(h):
            h[names[1]]["data_offsets"] = list(h[names[0]]["data_offsets"])

        def drop(h):  # a tensor removed from the header: its bytes are a hole
            del h[next(k for k in names if h[k]["data_offsets"][0] > 0)]

        def transpose(h):  # same bytes, the wrong shape for the config
            h[self.matrix]["shape"] = h[self.matrix]["shape"][::-1]

        same_size_int = {"BF16": "I16", "F16": "I16", "F32": "I32"}[self.header[first]["dtype"]]
        wider = {"BF16": "F32", "F16": "F32", "F32": "F64"}[self.header[first]["dtype"]]
        for name, mutate, needles, srv in (
                ("tensor-shifted", shift, ["belong to no tensor"], True),
                ("tensors-swapped", swap, ["needs"], False),
                ("tensors-overlap", overlap, ["overlap"], False),
                ("tensor-dropped-hole", drop, ["belong to no tensor"], False),
                ("begin-after-end", lambda h: h[first].update(data_offsets=h[first]["data_offsets"][::-1]),
                 [first], False),
                ("end-beyond-data", lambda h: h[first].update(data_offsets=[0, 1 << 40]), [first], False),
                ("offsets-negative", lambda h: h[first].update(data_offsets=[-8, 0]), ["data_offsets"], False),
                ("offsets-float", lambda h: h[first].update(data_offsets=[0.0, size(first)]), ["data_offsets"],
                 False),
                ("bad-dtype", lambda h: h[first].update(dtype="F99"), ["F99"], False),
                ("dtype-size-mismatch", lambda h: h[first].update(dtype=wider), ["needs"], False),
                ("dtype-integer", lambda h: h[first].update(dtype=same_size_int), [same_size_int], True),
                ("wrong-shape", transpose, [self.matrix, "expected"], True),
                ("negative-dim", lambda h: h[first].update(shape=[-1] + h[first]["shape"][1:]), ["negative"],
                 False),
                ("shape-overflow", lambda h: h[first].update(shape=[1 << 62, 1 << 62, 1 << 62]), ["overflows"],
                 False),
                ("dim-beyond-int64", lambda h: h[first].update(shape=[(1 << 63) + 5]), ["overflows"], False),
                ("shape-string", lambda h: h[first].update(shape=["256"]), ["non-integer"], False),
                ("no-offsets", lambda h: h[first].pop("data_offsets"), ["data_offsets"], False),
                ("entry-not-object", lambda h: h.update({first: [1, 2]}), ["not an object"], False),
                ("metadata-not-strings", lambda h: h.update({"__metadata__": {"format": 1}}), ["__metadata__"],
                 False)):
            self.header_case(name, mutate, needles, server=srv)

        def put(key, value):
            return lambda c: c.update({key: value})
        for key, value, srv in (("hidden_size", 1 << 40, True), ("num_hidden_layers", 10 ** 9, True),
                                ("num_hidden_layers", 1e9, False), ("num_heads", 0, True),
                                ("num_heads", -4, False), ("num_heads", "four", False),
                                ("vocab_size", 1 << 40, True), ("vocab_size", -1, False),
                                ("intermediate_size", 1 << 40, False), ("intermediate_size", 0, False),
                                ("hidden_size", (1 << 63) + 1, False), ("hidden_size", -256, False),
                                ("expand_k", 1e300, False), ("expand_v", -2.0, False),
                                ("bos_token_id", 1 << 40, False), ("norm_eps", "tiny", False)):
            self.config_case(f"config-{key}-{value}", put(key, value), [key], server=srv)
        # Consistent with itself but not with the tensors.
        self.config_case("config-num_heads-3", put("num_heads", 3), ["num_heads=3"])
        w = "model.safetensors"
        self.config_case("config-hidden_size-512", put("hidden_size", 512), ["expected"], file=w)
        self.config_case("config-vocab_size-100", put("vocab_size", 100), ["expected"], file=w)
        self.config_case("config-num_hidden_layers-1024", put("num_hidden_layers", 1024), ["missing tensor"],
                         server=True, file=w)

        def ratio(c):
            c.pop("intermediate_size", None)
            c["hidden_ratio"] = 1e300
        self.config_case("config-hidden_ratio-1e300", ratio, ["hidden_ratio"])
        self.config_case("config-not-json", lambda c: "{ not json", ["JSON"], server=True)
        self.config_case("config-array", lambda c: "[]", ["JSON"])
        self.config_case("config-huge", lambda c: " " * (17 << 20) + "{}", ["limit"])
        # Special files. A symlink to a regular file is fine (every case directory uses them).
        for entry, server in (("config.json", True), ("model.safetensors", True)):
            d = self.new(f"{entry}-fifo", [entry, "not a regular file"], server=server)
            os.mkfifo(self.replace(d, entry))
            d = self.new(f"{entry}-dev-zero", [entry, "not a regular file"], server=entry == "config.json")
            os.symlink("/dev/zero", self.replace(d, entry))
            d = self.new(f"{entry}-directory", [entry, "not a regular file"])
            os.mkdir(self.replace(d, entry))
            d = self.new(f"{entry}-dangling-link", [entry, "no such file"])
            os.symlink(os.path.join(d, "nowhere"), self.replace(d, entry))
        # Shards: a FIFO shard, a FIFO index, a truncated shard, bad shard names.
        d, weight_map = self.sharded("shard-fifo", ["model-00002-of-00002.safetensors", "not a regular file"],
                                     server=True)
        os.mkfifo(self.replace(d, "model-00002-of-00002.safetensors"))
        d, _ = self.sharded("shard-index-fifo", ["model.safetensors.index.json", "not a regular file"])
        os.mkfifo(self.replace(d, "model.safetensors.index.json"))
        d, _ = self.sharded("shard-dev-zero", ["model-00001-of-00002.safetensors", "not a regular file"])
        os.symlink("/dev/zero", self.replace(d, "model-00001-of-00002.safetensors"))
        d, _ = self.sharded("shard-truncated", ["model-00002-of-00002.safetensors", "data"])
        p = os.path.join(d, "model-00002-of-00002.safetensors")
        os.truncate(p, os.path.getsize(p) - 3)
        for name, value, needle in (("shard-name-parent", "../model.safetensors", "plain file name"),
                                    ("shard-name-missing", "model-00003-of-00002.safetensors", "no such file"),
                                    ("shard-name-number", 3, "not a file name")):
            d, wm = self.sharded(name, [needle])
            wm[names[0]] = value
            with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
                json.dump({"weight_map": wm}, f)
        d, _ = self.sharded("shard-index-no-map", ["weight_map"])
        with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
            f.write('{"weight_map": []}')
        # The tokenizer is the server's (a byte-level model otherwise).
        for name, make in (("tokenizer-fifo", os.mkfifo),
                           ("tokenizer-dev-zero", lambda p: os.symlink("/dev/zero", p)),
                           ("tokenizer-directory", os.mkdir)):
            d = self.new(name, ["tokenizer.model", "not a regular file"], server=True)
            make(os.path.join(d, "tokenizer.model"))
            self.cases[-1].forward = False
        d = self.new("tokenizer-garbage", ["tokenizer.model"], server=True)
        with open(os.path.join(d, "tokenizer.model"), "wb") as f:
            f.write(b"\x0a\xff\xff\xff\xff\x0fnot a sentencepiece model")
        self.cases[-1].forward = False


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--forward", required=True)
    ap.add_argument("--server", required=True)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args()
    root = tempfile.mkdtemp(prefix="retnet-corrupt-")
    try:
        tokens = os.path.join(root, "tokens.safetensors")
        write_st(tokens, {"tokens": {"dtype": "I64", "shape": [1, 4], "data_offsets": [0, 32]}},
                 struct.pack("<4q", 256, 72, 105, 33))

        def forward(d):
            return run([args.forward, "--checkpoint", d, "--input", tokens,
                        "--output", os.path.join(root, os.path.basename(d) + ".out.safetensors")], root)

        def server(d):
            return run([args.server, "--checkpoint", d, "--listen", "127.0.0.1:0", "--metrics-listen", "", "--http-listen", "",
                        "--log-level", "warn"], root)

        # The valid checkpoint loads in both, under the same limits.
        rc, err, secs, rss = forward(args.checkpoint)
        check(rc == 0, f"retnet-forward: the valid checkpoint loads and runs (exit {rc} in {secs:.1f} s, "
                       f"{rss:.0f} MB, {err.strip()[:200]!r})")
        srv = ServerProcess(args.server, root, "valid", "--checkpoint", args.checkpoint, "--log-level", "warn",
                            preexec_fn=limit_address_space, load_timeout_s=TIMEOUT_S)
        check(srv.stop() == 0, "retnet-server: the valid checkpoint loads, serves and drains on SIGTERM")

        corpus = Corpus(args.checkpoint, root)
        corpus.build()
        runs = []
        for case in corpus.cases:
            if getattr(case, "forward", True):
                runs.append(("retnet-forward", forward, case))
            if case.server:
                runs.append(("retnet-server", server, case))
        t0 = time.monotonic()
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            results = list(pool.map(lambda r: (r[0], r[2], r[1](r[2].dir)), runs))
        for tool, case, (rc, err, secs, rss) in results:
            lines = [ln for ln in err.splitlines() if ln.strip()]
            line = lines[-1] if lines else ""
            missing = [n for n in case.needles if n not in line]
            check(rc == 1 and len(lines) == 1 and not missing and rss < MAX_RSS_MB,
                  f"{tool} {case.name}: exit {rc} in {secs:.1f} s, peak RSS {rss:.0f} MB, {len(lines)} line(s)"
                  f"{', missing ' + repr(missing) if missing else ''}: {line[-170:]!r}")
        n_server = sum(1 for tool, _, _ in results if tool == "retnet-server")
        print(f"{len(corpus.cases)} cases, {len(runs)} runs ({n_server} through the server) "
              f"in {time.monotonic() - t0:.0f} s with {args.jobs} jobs")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return finish()


if __name__ == "__main__":
    sys.exit(main())
