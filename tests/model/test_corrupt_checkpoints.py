"""A checkpoint-corruption corpus through retnet-forward and retnet-server --checkpoint.

usage: test_corrupt_checkpoints.py --forward build/bin/retnet-forward --server build/bin/retnet-server
                                   --checkpoint model/default

From the valid built-in checkpoint it derives truncations of model.safetensors, header-length and
header-JSON mutations (holes, overlaps, bad dtypes, shapes that overflow), config.json mutations
with absurd sizes, and special files (a FIFO, /dev/zero, a directory) in place of config.json, the
weights and the tokenizer. Every case must end with exit status 1 and one error line on stderr,
within a time limit, without a signal, and with a peak RSS far below a multi-GB allocation.
The unmodified checkpoint must still load (exit 0), so the corpus tests the checks, not a
broken tool.
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
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from harness import check, finish  # noqa: E402

TIMEOUT_S = 30
MAX_RSS_MB = 1024


def run(cmd):
    """(exit status or -signal, stderr text, seconds, peak RSS in MB); status None on a timeout."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        return None, err.decode(errors="replace"), time.monotonic() - t0, 0.0
    # ru_maxrss of the children reaped so far: the largest of them (each case checks its own).
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
    return proc.returncode, err.decode(errors="replace"), time.monotonic() - t0, rss


def read_st(path):
    data = open(path, "rb").read()
    n = struct.unpack("<Q", data[:8])[0]
    return n, json.loads(data[8:8 + n]), data[8 + n:]


def write_st(path, header, body, header_len=None, pad_to=None):
    text = json.dumps(header, separators=(",", ":")).encode()
    if pad_to is not None:
        text = text.ljust(pad_to, b" ")
    n = len(text) if header_len is None else header_len
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", n) + text + body)


class Corpus:
    def __init__(self, src, root):
        self.src, self.root = src, root
        self.cases = []  # (name, dir, server too)
        self.n_header, self.header, self.body = read_st(os.path.join(src, "model.safetensors"))
        self.config = json.load(open(os.path.join(src, "config.json")))

    def new(self, name, server=False):
        d = os.path.join(self.root, f"{len(self.cases):02d}-{name}")
        os.makedirs(d)
        for f in ("config.json", "model.safetensors"):
            os.symlink(os.path.abspath(os.path.join(self.src, f)), os.path.join(d, f))
        self.cases.append((name, d, server))
        return d

    def replace(self, d, name):
        p = os.path.join(d, name)
        os.unlink(p)
        return p

    def weights(self, name, data, server=False):
        d = self.new(name, server)
        with open(self.replace(d, "model.safetensors"), "wb") as f:
            f.write(data)

    def header_case(self, name, mutate, server=False):
        h = json.loads(json.dumps(self.header))
        mutate(h)
        d = self.new(name, server)
        write_st(self.replace(d, "model.safetensors"), h, self.body, pad_to=self.n_header)

    def config_case(self, name, mutate, server=False):
        c = dict(self.config)
        text = mutate(c)
        d = self.new(name, server)
        with open(self.replace(d, "config.json"), "w") as f:
            f.write(text if isinstance(text, str) else json.dumps(c))

    def build(self):
        raw = open(os.path.join(self.src, "model.safetensors"), "rb").read()
        n = self.n_header
        for cut in (0, 4, 8, 9, 8 + n // 2, 8 + n - 1, 8 + n, 8 + n + len(self.body) // 2, len(raw) - 1):
            self.weights(f"truncated-at-{cut}", raw[:cut], server=cut in (0, len(raw) - 1))
        for delta, srv in ((-1, True), (1, False), (-8, False), (8, False)):
            self.weights(f"header-length{delta:+d}", struct.pack("<Q", n + delta) + raw[8:], server=srv)
        for value in (0, 1 << 40, (1 << 64) - 1):
            self.weights(f"header-length-{value}", struct.pack("<Q", value) + raw[8:])
        self.weights("header-not-json", raw[:8] + b"x" + raw[9:])
        self.weights("trailing-bytes", raw + b"\0" * 16, server=True)
        names = sorted(k for k in self.header if k != "__metadata__")
        first = min(names, key=lambda k: self.header[k]["data_offsets"][0])

        def shift(h):
            b, e = h[first]["data_offsets"]
            h[first]["data_offsets"] = [b + 4, e + 4]

        def size(k):
            b, e = self.header[k]["data_offsets"]
            return e - b

        def hole_and_overlap(h):
            # two tensors of different sizes swap offsets: their byte counts no longer match
            a = names[0]
            b = next(k for k in names if size(k) != size(a))
            h[a]["data_offsets"], h[b]["data_offsets"] = h[b]["data_offsets"], h[a]["data_offsets"]

        def overlap(h):
            h[names[1]]["data_offsets"] = list(h[names[0]]["data_offsets"])

        self.header_case("tensor-shifted", shift, server=True)
        self.header_case("tensors-swapped", hole_and_overlap)
        self.header_case("tensors-overlap", overlap)
        self.header_case("begin-after-end", lambda h: h[first].update(data_offsets=h[first]["data_offsets"][::-1]))
        self.header_case("end-beyond-data", lambda h: h[first].update(data_offsets=[0, 1 << 40]))
        self.header_case("bad-dtype", lambda h: h[first].update(dtype="F99"))
        wider = {"BF16": "F32", "F16": "F32", "F32": "F64"}.get(self.header[first]["dtype"], "F64")
        self.header_case("dtype-size-mismatch", lambda h: h[first].update(dtype=wider))
        self.header_case("negative-dim", lambda h: h[first].update(shape=[-1] + h[first]["shape"][1:]))
        self.header_case("shape-overflow", lambda h: h[first].update(shape=[1 << 62, 1 << 62, 1 << 62]))
        self.header_case("dim-beyond-int64", lambda h: h[first].update(shape=[(1 << 63) + 5]))
        self.header_case("no-offsets", lambda h: h[first].pop("data_offsets"))
        self.header_case("entry-not-object", lambda h: h.update({first: [1, 2]}))

        def put(key, value):
            return lambda c: c.update({key: value})
        for key, value, srv in (("hidden_size", 1 << 40, True), ("num_hidden_layers", 10 ** 9, True),
                                ("num_hidden_layers", 1e9, False), ("num_heads", 0, True),
                                ("num_heads", -4, False), ("num_heads", "four", False),
                                ("vocab_size", 1 << 40, True), ("intermediate_size", 1 << 40, False),
                                ("hidden_size", (1 << 63) + 1, False), ("num_heads", 3, False),
                                ("hidden_size", 512, False), ("vocab_size", 100, False)):
            self.config_case(f"config-{key}-{value}", put(key, value), server=srv)

        def ratio(c):
            c.pop("intermediate_size", None)
            c["hidden_ratio"] = 1e300
        self.config_case("config-hidden_ratio-1e300", ratio)
        self.config_case("config-not-json", lambda c: "{ not json", server=True)
        self.config_case("config-array", lambda c: "[]")
        # Special files.
        d = self.new("config-fifo", server=True)
        os.mkfifo(self.replace(d, "config.json"))
        d = self.new("config-dev-zero", server=True)
        os.symlink("/dev/zero", self.replace(d, "config.json"))
        d = self.new("config-directory")
        os.mkdir(self.replace(d, "config.json"))
        d = self.new("weights-fifo", server=True)
        os.mkfifo(self.replace(d, "model.safetensors"))
        d = self.new("weights-dev-zero")
        os.symlink("/dev/zero", self.replace(d, "model.safetensors"))
        d = self.new("weights-directory")
        os.mkdir(self.replace(d, "model.safetensors"))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--forward", required=True)
    ap.add_argument("--server", required=True)
    ap.add_argument("--checkpoint", required=True)
    args = ap.parse_args()
    root = tempfile.mkdtemp(prefix="retnet-corrupt-")
    try:
        tokens = os.path.join(root, "tokens.safetensors")
        write_st(tokens, {"tokens": {"dtype": "I64", "shape": [1, 4], "data_offsets": [0, 32]}},
                 struct.pack("<4q", 256, 72, 105, 33))
        out = os.path.join(root, "out.safetensors")

        def forward(d):
            return run([args.forward, "--checkpoint", d, "--input", tokens, "--output", out])

        def server(d):
            return run([args.server, "--checkpoint", d, "--listen", "127.0.0.1:0", "--metrics-listen", "",
                        "--log-level", "warn"])

        rc, err, _, _ = forward(args.checkpoint)
        check(rc == 0, f"the valid checkpoint loads and runs ({rc}, {err.strip()[:200]})")
        corpus = Corpus(args.checkpoint, root)
        corpus.build()
        # The tokenizer is the server's: a FIFO as tokenizer.model (a byte-level model otherwise).
        d = corpus.new("tokenizer-fifo", server=True)
        os.mkfifo(os.path.join(d, "tokenizer.model"))
        t0 = time.monotonic()
        n_server = 0
        for name, d, with_server in corpus.cases:
            tools = [("retnet-forward", forward)] if name != "tokenizer-fifo" else []
            if with_server:
                tools.append(("retnet-server", server))
                n_server += 1
            for tool, fn in tools:
                rc, err, secs, rss = fn(d)
                lines = [ln for ln in err.splitlines() if ln.strip()]
                check(rc == 1 and len(lines) == 1 and rss < MAX_RSS_MB,
                      f"{tool} {name}: exit {rc} in {secs:.1f} s, peak RSS {rss:.0f} MB, "
                      f"{len(lines)} line(s): {lines[-1][:160] if lines else ''!r}")
        print(f"{len(corpus.cases)} cases ({n_server} also through the server) in {time.monotonic() - t0:.0f} s")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return finish()


if __name__ == "__main__":
    sys.exit(main())
