#!/usr/bin/python3
"""Train retnet-serve's built-in default model.

A small byte-level RetNet in the fla (flash-linear-attention) layout, trained on the
King James Version of the Bible (public domain text) as shipped by the Debian package
`bible-kjv-text` and dumped with the `bible` program from the `bible-kjv` package.

Run with Debian's Python (torch 1.13, CPU):

    /usr/bin/python3 tools/train_default_model.py --out model/default

The defaults reproduce the committed model in model/default/.  The script is
self-contained: its own RetNet (fla math), its own safetensors writer/reader.

Model math (fla RetNet, see shared/reference/retnet-spec.md sections 1 and 4):
  x = embeddings[ids]
  per layer:  x = x + MSR(RMSNorm_attn(x));  x = x + MLP(RMSNorm_mlp(x))
  logits = lm_head(RMSNorm(x))                               (untied)
  MSR:  q,k,v,g = linear (no bias); rotate-half rotary on q,k (pair i = (i, i+d_k/2),
        theta_i = 10000^(-2i/d_k), 0-based positions, fp32 angles); q *= d_k^-0.5;
        gamma_h = 1 - 2^(-5-h);  o_n = sum_{m<=n} gamma^(n-m) (q_n . k_m) v_m  (raw);
        y = RMSNorm_dv(o) * w_shared[d_v] * silu(g);  out = o_proj(y)
  MLP:  down(silu(gate x) * up x),  I = 256*ceil(int(D*hidden_ratio*2/3)/256)

Tokenizer: ids 0..255 are raw UTF-8 bytes, 256 = BOS "<s>", 257 = EOS "</s>".
Every chapter of the corpus becomes one document "<s>" + text + "</s>" (verse
references stripped, one verse per line); documents are concatenated into one
token stream and training windows are cut from it at random offsets.
"""

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

VOCAB = 258
BOS = 256
EOS = 257

DEFAULTS = dict(
    hidden_size=256,
    num_hidden_layers=4,
    num_heads=4,
    expand_k=1.0,
    expand_v=2.0,
    hidden_ratio=2,
    norm_eps=1e-6,
    seq_len=256,
    batch_size=16,
    steps=1200,
    lr=3e-3,
    min_lr_frac=0.1,
    warmup=100,
    weight_decay=0.1,
    grad_clip=1.0,
    seed=1234,
    val_every=20,  # every 20th chapter goes to the validation split
)

KJV_PACKAGES = ["bible-kjv", "bible-kjv-text"]
KJV_RANGE = "Gen1:1-Rev22:21"


# ----------------------------------------------------------------------------------------
# Corpus
# ----------------------------------------------------------------------------------------

def log(msg, fh=None):
    line = "[%s] %s" % (time.strftime("%H:%M:%S"), msg)
    print(line, flush=True)
    if fh is not None:
        fh.write(line + "\n")
        fh.flush()


def ensure_kjv_installed(logfh):
    """Idempotently install the Debian packages that ship the KJV text."""
    if shutil.which("bible") is not None and os.path.exists("/usr/lib/bible.data"):
        return
    cmd = ["apt-get", "install", "-y", "--no-install-recommends"] + KJV_PACKAGES
    if os.geteuid() != 0:
        sys.exit("the corpus needs Debian packages %s; run as root:\n  %s"
                 % (" ".join(KJV_PACKAGES), " ".join(cmd)))
    log("installing %s with apt-get" % " ".join(KJV_PACKAGES), logfh)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(cmd, check=True, env=env)


def package_version(pkg):
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", pkg],
                             capture_output=True, text=True, check=True).stdout
        return out.strip()
    except Exception:
        return "unknown"


def load_kjv_documents(logfh):
    """Return (list of chapter strings, corpus description dict)."""
    ensure_kjv_installed(logfh)
    raw = subprocess.run(["bible", "-f", KJV_RANGE], capture_output=True,
                         check=True).stdout
    sha = hashlib.sha256(raw).hexdigest()
    text = raw.decode("ascii")
    pat = re.compile(r"^([1-3]?[A-Za-z]+)(\d+):(\d+) (.*)$")
    chapters = []
    cur_key, cur = None, []
    for line in text.split("\n"):
        if not line:
            continue
        m = pat.match(line)
        if m is None:
            raise ValueError("unexpected line in bible output: %r" % line[:80])
        key = (m.group(1), m.group(2))
        if key != cur_key:
            if cur:
                chapters.append("\n".join(cur) + "\n")
            cur_key, cur = key, []
        cur.append(m.group(4).strip())
    if cur:
        chapters.append("\n".join(cur) + "\n")
    desc = {
        "name": "King James Version of the Bible (1611/1769 text)",
        "packages": {p: package_version(p) for p in KJV_PACKAGES},
        "files": ["/usr/lib/bible.data", "/usr/lib/bible.data.conc"],
        "extraction": "bible -f %s (verse references stripped, one verse per line, "
                      "one document per chapter)" % KJV_RANGE,
        "dump_sha256": sha,
        "dump_bytes": len(raw),
        "license": "public domain text (copyright expired); bible-kjv program GPL-2+ "
                   "(see /usr/share/doc/bible-kjv-text/copyright)",
    }
    return chapters, desc


def load_plain_documents(path):
    with open(path, "rb") as f:
        raw = f.read()
    text = raw.decode("utf-8", errors="replace")
    docs = [d.strip("\n") + "\n" for d in re.split(r"\n\s*\n", text) if d.strip()]
    desc = {"name": os.path.basename(path), "files": [os.path.abspath(path)],
            "dump_sha256": hashlib.sha256(raw).hexdigest(), "dump_bytes": len(raw),
            "extraction": "paragraphs separated by blank lines, one document each",
            "license": "see source"}
    return docs, desc


def encode_docs(docs):
    ids = []
    for d in docs:
        ids.append(BOS)
        ids.extend(d.encode("utf-8"))
        ids.append(EOS)
    return torch.tensor(ids, dtype=torch.long)


# ----------------------------------------------------------------------------------------
# Model (fla RetNet math)
# ----------------------------------------------------------------------------------------

def intermediate_size(D, hidden_ratio):
    return 256 * math.ceil(int(D * hidden_ratio * 2 / 3) / 256)


def rms_norm(x, w, eps):
    xf = x.float()
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w


class RMSNorm(nn.Module):
    def __init__(self, d, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


def rotary_cos_sin(positions, d_k):
    """positions: 1-D long tensor. Returns cos, sin of shape [T, d_k] (fp32), rotate-half."""
    half = d_k // 2
    inv = 10000.0 ** (-(torch.arange(half, dtype=torch.float32) * 2.0) / d_k)
    ang = positions.to(torch.float32)[:, None] * inv[None, :]
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos(), ang.sin()


def apply_rotary(x, cos, sin):
    # x [..., T, d_k]; pairs (i, i + d_k/2): (a, b) -> (a cos - b sin, b cos + a sin)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    rot = torch.cat([-x2, x1], dim=-1)
    return x * cos + rot * sin


class MultiScaleRetention(nn.Module):
    def __init__(self, D, H, expand_k, expand_v, eps):
        super().__init__()
        self.H = H
        self.key_dim = int(D * expand_k)
        self.value_dim = int(D * expand_v)
        self.d_k = self.key_dim // H
        self.d_v = self.value_dim // H
        self.eps = eps
        self.q_proj = nn.Linear(D, self.key_dim, bias=False)
        self.k_proj = nn.Linear(D, self.key_dim, bias=False)
        self.v_proj = nn.Linear(D, self.value_dim, bias=False)
        self.g_proj = nn.Linear(D, self.value_dim, bias=False)
        self.o_proj = nn.Linear(self.value_dim, D, bias=False)
        self.g_norm_swish_gate = RMSNorm(self.d_v, eps)
        h = torch.arange(H, dtype=torch.float32)
        self.register_buffer("log_gamma", torch.log(1.0 - torch.pow(2.0, -5.0 - h)),
                             persistent=False)

    def _qkvg(self, x, positions):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.H, self.d_k).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.H, self.d_k).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.H, self.d_v).transpose(1, 2)
        g = self.g_proj(x)
        cos, sin = rotary_cos_sin(positions, self.d_k)
        q = apply_rotary(q, cos, sin) * (self.d_k ** -0.5)
        k = apply_rotary(k, cos, sin)
        return q, k, v, g

    def _out(self, o, g):
        # o [B, H, T, d_v] -> per-head RMSNorm (shared affine) * silu(g) -> o_proj
        B, H, T, dv = o.shape
        o = rms_norm(o, self.g_norm_swish_gate.weight, self.eps)
        o = o.transpose(1, 2).reshape(B, T, H * dv)
        return self.o_proj(o * F.silu(g))

    def forward(self, x, start=0):
        """Parallel form over a whole sequence starting at absolute position `start`."""
        T = x.shape[1]
        pos = torch.arange(start, start + T)
        q, k, v, g = self._qkvg(x, pos)
        n = torch.arange(T)
        diff = (n[:, None] - n[None, :]).to(torch.float32)
        mask = torch.exp(diff[None] * self.log_gamma[:, None, None])
        mask = mask.masked_fill((diff < 0)[None], 0.0)  # [H, T, T]
        scores = (q @ k.transpose(-1, -2)) * mask
        o = scores @ v
        return self._out(o, g)

    def step(self, x, state, pos):
        """Recurrent form, one token. x [B, 1, D]; state [B, H, d_k, d_v] (fp32) or None."""
        B = x.shape[0]
        q, k, v, g = self._qkvg(x, torch.tensor([pos]))
        q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0]  # [B, H, d]
        if state is None:
            state = torch.zeros(B, self.H, self.d_k, self.d_v)
        gamma = torch.exp(self.log_gamma)[None, :, None, None]
        state = gamma * state + k[..., :, None] * v[..., None, :]
        o = torch.einsum("bhk,bhkv->bhv", q, state)[:, :, None]  # [B, H, 1, d_v]
        return self._out(o, g), state


class GatedMLP(nn.Module):
    def __init__(self, D, I):
        super().__init__()
        self.gate_proj = nn.Linear(D, I, bias=False)
        self.up_proj = nn.Linear(D, I, bias=False)
        self.down_proj = nn.Linear(I, D, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        D, eps = cfg["hidden_size"], cfg["norm_eps"]
        self.attn_norm = RMSNorm(D, eps)
        self.attn = MultiScaleRetention(D, cfg["num_heads"], cfg["expand_k"],
                                        cfg["expand_v"], eps)
        self.mlp_norm = RMSNorm(D, eps)
        self.mlp = GatedMLP(D, cfg["intermediate_size"])

    def forward(self, x, start=0):
        x = x + self.attn(self.attn_norm(x), start)
        return x + self.mlp(self.mlp_norm(x))

    def step(self, x, state, pos):
        a, state = self.attn.step(self.attn_norm(x), state, pos)
        x = x + a
        return x + self.mlp(self.mlp_norm(x)), state


class RetNetModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.embeddings = nn.Embedding(cfg["vocab_size"], cfg["hidden_size"])
        self.layers = nn.ModuleList([Block(cfg) for _ in range(cfg["num_hidden_layers"])])
        self.norm = RMSNorm(cfg["hidden_size"], cfg["norm_eps"])


class RetNetForCausalLM(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.model = RetNetModel(cfg)
        self.lm_head = nn.Linear(cfg["hidden_size"], cfg["vocab_size"], bias=False)
        self._init_weights()

    def _init_weights(self):
        std = 0.02
        L = self.cfg["num_hidden_layers"]
        for name, p in self.named_parameters():
            if name.endswith("norm.weight") or name.endswith("g_norm_swish_gate.weight"):
                nn.init.ones_(p)
            elif name.endswith("o_proj.weight") or name.endswith("down_proj.weight"):
                # residual-branch outputs: scaled down with depth
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * L))
            else:
                nn.init.normal_(p, 0.0, std)

    def forward(self, ids, start=0):
        x = self.model.embeddings(ids)
        for layer in self.model.layers:
            x = layer(x, start)
        return self.lm_head(self.model.norm(x))

    def step(self, ids, states, pos):
        """ids [B, 1]; states: list per layer (or None). Returns logits [B, V], states."""
        x = self.model.embeddings(ids)
        if states is None:
            states = [None] * len(self.model.layers)
        new = []
        for layer, s in zip(self.model.layers, states):
            x, s = layer.step(x, s, pos)
            new.append(s)
        return self.lm_head(self.model.norm(x))[:, -1], new


# ----------------------------------------------------------------------------------------
# safetensors (own minimal writer / reader)
# ----------------------------------------------------------------------------------------

def save_safetensors_bf16(tensors, path, metadata):
    header = {}
    blobs = []
    off = 0
    for name in sorted(tensors):
        t = tensors[name].detach().to(torch.bfloat16).contiguous()
        b = t.view(torch.int16).numpy().astype("<i2").tobytes()
        header[name] = {"dtype": "BF16", "shape": list(t.shape),
                        "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    hj = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hj += b" " * ((8 - len(hj) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hj)))
        f.write(hj)
        for b in blobs:
            f.write(b)


def load_safetensors_bf16(path):
    import numpy as np
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n].decode("utf-8"))
    meta = header.pop("__metadata__", {})
    base = 8 + n
    out = {}
    for name, info in header.items():
        assert info["dtype"] == "BF16", info
        s, e = info["data_offsets"]
        arr = np.frombuffer(data[base + s:base + e], dtype="<i2").copy()
        t = torch.from_numpy(arr).view(torch.bfloat16).reshape(info["shape"])
        out[name] = t
    return out, meta


# ----------------------------------------------------------------------------------------
# Training / evaluation
# ----------------------------------------------------------------------------------------

def lr_at(step, a):
    if step < a.warmup:
        return a.lr * (step + 1) / a.warmup
    p = (step - a.warmup) / max(1, a.steps - a.warmup)
    return a.lr * (a.min_lr_frac + (1 - a.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * p)))


@torch.no_grad()
def evaluate(model, stream, T, max_windows=None, batch=32):
    """Mean next-token loss (nats) over non-overlapping windows of the stream."""
    model.eval()
    nwin = (len(stream) - 1) // T
    if max_windows is not None:
        nwin = min(nwin, max_windows)
    tot, cnt = 0.0, 0
    for i in range(0, nwin, batch):
        idx = torch.arange(i, min(nwin, i + batch)) * T
        x = torch.stack([stream[j:j + T] for j in idx.tolist()])
        y = torch.stack([stream[j + 1:j + T + 1] for j in idx.tolist()])
        logits = model(x)
        tot += F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1),
                               reduction="sum").item()
        cnt += y.numel()
    model.train()
    return tot / cnt


@torch.no_grad()
def generate_parallel_greedy(model, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        logits = model(torch.tensor([ids]))[0, -1]
        ids.append(int(torch.argmax(logits)))
    return ids[len(prompt):]


@torch.no_grad()
def generate_recurrent(model, prompt, n, temperature=0.0, gen=None, stop_at_eos=False):
    """Token-by-token with the recurrent state; positions continue from the prompt."""
    states, logits, pos = None, None, 0
    for t in prompt:
        logits, states = model.step(torch.tensor([[t]]), states, pos)
        pos += 1
    out = []
    max_dev = 0.0
    for _ in range(n):
        if temperature <= 0:
            nxt = int(torch.argmax(logits[0]))
        else:
            probs = torch.softmax(logits[0] / temperature, dim=-1)
            nxt = int(torch.multinomial(probs, 1, generator=gen))
        out.append(nxt)
        if stop_at_eos and nxt == EOS:
            break
        logits, states = model.step(torch.tensor([[nxt]]), states, pos)
        pos += 1
    return out


def decode(ids):
    b = bytes(i for i in ids if i < 256)
    s = b.decode("utf-8", errors="replace")
    return s


def show(ids):
    # decode byte runs, keep the special tokens visible
    out, run = [], []
    for i in ids:
        if i < 256:
            run.append(i)
        else:
            if run:
                out.append(decode(run))
                run = []
            out.append("<s>" if i == BOS else "</s>")
    if run:
        out.append(decode(run))
    return "".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="model/default")
    ap.add_argument("--steps", type=int, default=DEFAULTS["steps"])
    ap.add_argument("--corpus", default=None,
                    help="plain UTF-8 text file instead of the KJV (paragraphs = documents)")
    ap.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    ap.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    ap.add_argument("--seq-len", type=int, default=DEFAULTS["seq_len"])
    ap.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--log", default="/tmp/train_default_model.log")
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--layers", type=int, default=DEFAULTS["num_hidden_layers"])
    a = ap.parse_args()
    a.warmup = DEFAULTS["warmup"]
    a.min_lr_frac = DEFAULTS["min_lr_frac"]

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    logfh = open(a.log, "a")
    t_start = time.time()
    log("args: %s" % vars(a), logfh)

    # ---- data
    if a.corpus:
        docs, corpus = load_plain_documents(a.corpus)
    else:
        docs, corpus = load_kjv_documents(logfh)
    ve = DEFAULTS["val_every"]
    train_docs = [d for i, d in enumerate(docs) if i % ve != ve - 1]
    val_docs = [d for i, d in enumerate(docs) if i % ve == ve - 1]
    train = encode_docs(train_docs)
    val = encode_docs(val_docs)
    log("corpus: %s, %d documents, sha256 %s" % (corpus["name"], len(docs),
                                                corpus["dump_sha256"]), logfh)
    log("train tokens %d (%d docs), val tokens %d (%d docs)"
        % (len(train), len(train_docs), len(val), len(val_docs)), logfh)

    # ---- model
    D = DEFAULTS["hidden_size"]
    cfg = dict(
        hidden_size=D, num_hidden_layers=a.layers, num_heads=DEFAULTS["num_heads"],
        expand_k=DEFAULTS["expand_k"], expand_v=DEFAULTS["expand_v"],
        hidden_ratio=DEFAULTS["hidden_ratio"],
        intermediate_size=intermediate_size(D, DEFAULTS["hidden_ratio"]),
        norm_eps=DEFAULTS["norm_eps"], vocab_size=VOCAB,
    )
    model = RetNetForCausalLM(cfg)
    nparams = sum(p.numel() for p in model.parameters())
    log("model: %s, %d parameters (%.2f MB in bf16)" % (cfg, nparams, nparams * 2 / 1e6), logfh)

    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (decay if p.dim() == 2 and "embeddings" not in n else no_decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": DEFAULTS["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.95), eps=1e-8)
    gen = torch.Generator().manual_seed(a.seed)
    T, B = a.seq_len, a.batch_size
    ema = None
    t0 = time.time()
    model.train()
    for step in range(a.steps):
        lr = lr_at(step, a)
        for grp in opt.param_groups:
            grp["lr"] = lr
        off = torch.randint(0, len(train) - T - 1, (B,), generator=gen)
        x = torch.stack([train[o:o + T] for o in off.tolist()])
        y = torch.stack([train[o + 1:o + T + 1] for o in off.tolist()])
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), DEFAULTS["grad_clip"])
        opt.step()
        lv = loss.item()
        ema = lv if ema is None else 0.98 * ema + 0.02 * lv
        if step % 10 == 0 or step == a.steps - 1:
            el = time.time() - t0
            log("step %5d/%d loss %.4f ema %.4f (%.3f bpb) lr %.2e gnorm %.2f  %.2fs/step eta %.0fs"
                % (step, a.steps, lv, ema, ema / math.log(2), lr, gn, el / (step + 1),
                   el / (step + 1) * (a.steps - step - 1)), logfh)
        if a.eval_every and step > 0 and step % a.eval_every == 0:
            vl = evaluate(model, val, T, max_windows=64)
            log("  eval step %d: val loss %.4f nats/byte (%.3f bits/byte) [64 windows]"
                % (step, vl, vl / math.log(2)), logfh)
    train_time = time.time() - t0
    log("training done in %.0fs" % train_time, logfh)

    # ---- final evaluation (fp32 weights and bf16-rounded weights)
    model.eval()
    tl = evaluate(model, train, T, max_windows=512)
    vl = evaluate(model, val, T)
    log("final fp32: train %.4f nats/byte (%.3f bpb) [512 windows], val %.4f (%.3f bpb) [all %d windows]"
        % (tl, tl / math.log(2), vl, vl / math.log(2), (len(val) - 1) // T), logfh)

    # ---- save
    os.makedirs(a.out, exist_ok=True)
    sd = {k: v for k, v in model.state_dict().items() if "log_gamma" not in k}
    metadata = {
        "format": "pt",
        "model": "retnet-serve default model: byte-level RetNet (fla layout)",
        "tokenizer": "byte (0..255 bytes, 256 <s>, 257 </s>)",
        "corpus": "%s; Debian %s; sha256 of dump %s" % (
            corpus["name"], ", ".join("%s %s" % kv for kv in corpus.get("packages", {}).items())
            or "n/a", corpus["dump_sha256"]),
        "recipe": ("tools/train_default_model.py --steps %d --seed %d: AdamW(0.9,0.95) lr %g "
                   "warmup %d cosine to %g, wd %g, clip %g, batch %dx%d bytes, fp32 CPU, "
                   "val = every %dth chapter"
                   % (a.steps, a.seed, a.lr, a.warmup, a.lr * a.min_lr_frac,
                      DEFAULTS["weight_decay"], DEFAULTS["grad_clip"], B, T, ve)),
        "final_loss": "train %.4f val %.4f nats/byte (fp32 weights)" % (tl, vl),
    }
    st_path = os.path.join(a.out, "model.safetensors")
    save_safetensors_bf16(sd, st_path, metadata)
    size = os.path.getsize(st_path)
    log("wrote %s (%d bytes, %d tensors)" % (st_path, size, len(sd)), logfh)
    if size > 8_000_000:
        log("WARNING: file exceeds 8,000,000 bytes", logfh)

    config = {
        "model_type": "retnet",
        "architectures": ["RetNetForCausalLM"],
        "attn_mode": "chunk",
        "hidden_size": D,
        "expand_k": cfg["expand_k"],
        "expand_v": cfg["expand_v"],
        "hidden_ratio": cfg["hidden_ratio"],
        "intermediate_size": cfg["intermediate_size"],
        "num_hidden_layers": cfg["num_hidden_layers"],
        "num_heads": cfg["num_heads"],
        "num_kv_heads": None,
        "feature_map": None,
        "hidden_act": "swish",
        "use_short_conv": False,
        "conv_size": 4,
        "use_output_gate": True,
        "max_position_embeddings": 2048,
        "elementwise_affine": True,
        "norm_eps": cfg["norm_eps"],
        "fuse_norm": True,
        "fuse_swiglu": True,
        "attn": None,
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
        "vocab_size": VOCAB,
        "bos_token_id": BOS,
        "eos_token_id": EOS,
        "pad_token_id": None,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "tokenizer": "byte",
    }
    with open(os.path.join(a.out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")

    # ---- reload the committed bf16 weights and check forms + sample
    loaded, meta = load_safetensors_bf16(st_path)
    assert set(loaded) == set(sd), set(loaded) ^ set(sd)
    m2 = RetNetForCausalLM(cfg)
    missing = m2.load_state_dict({k: v.float() for k, v in loaded.items()}, strict=False)
    assert not missing.unexpected_keys and all("log_gamma" in k for k in missing.missing_keys), missing
    m2.eval()
    tl16 = evaluate(m2, train, T, max_windows=512)
    vl16 = evaluate(m2, val, T)
    log("final bf16 weights: train %.4f (%.3f bpb), val %.4f (%.3f bpb)"
        % (tl16, tl16 / math.log(2), vl16, vl16 / math.log(2)), logfh)

    # parallel vs recurrent logits on one held-out window
    with torch.no_grad():
        x = val[:128][None]
        par = m2(x)[0]
        states, rec = None, []
        for i in range(x.shape[1]):
            lg, states = m2.step(x[:, i:i + 1], states, i)
            rec.append(lg[0])
        rec = torch.stack(rec)
        dmax = (par - rec).abs().max().item()
    log("parallel vs recurrent logits, 128 tokens: max abs diff %.3e" % dmax, logfh)
    assert dmax < 1e-3, dmax

    prompts = ["The ", "And God said", "In the beginning", "Jesus ", "And it came to pass"]
    samples = []
    all_ok = True
    for p in prompts:
        pid = [BOS] + list(p.encode("utf-8"))
        rg = generate_recurrent(m2, pid, 160)
        pg = generate_parallel_greedy(m2, pid, 160)
        ok = rg == pg
        all_ok &= ok
        log("greedy %r (recurrent==parallel: %s):\n%s%s" % (p, ok, p, show(rg)), logfh)
        samples.append(("greedy", p, show(rg)))
    sgen = torch.Generator().manual_seed(a.seed)
    for p in prompts[:3]:
        pid = [BOS] + list(p.encode("utf-8"))
        rs = generate_recurrent(m2, pid, 160, temperature=0.7, gen=sgen)
        log("temperature 0.7 %r:\n%s%s" % (p, p, show(rs)), logfh)
        samples.append(("T=0.7", p, show(rs)))
    log("greedy recurrent == parallel for all prompts: %s" % all_ok, logfh)

    total = time.time() - t_start
    write_readme(a, cfg, corpus, nparams, size, tl, vl, tl16, vl16, samples, train_time,
                 total, len(train), len(val), dmax, all_ok, len(docs))
    log("total wall time %.0fs" % total, logfh)
    if not all_ok:
        sys.exit(1)


def write_readme(a, cfg, corpus, nparams, size, tl, vl, tl16, vl16, samples, train_time,
                 total, ntrain, nval, dmax, all_ok, ndocs):
    L2 = math.log(2)
    pk = ", ".join("`%s` %s" % kv for kv in corpus.get("packages", {}).items())
    lines = []
    lines.append("# retnet-serve default model\n")
    lines.append("A small byte-level RetNet that the server uses whenever no checkpoint is given. "
                 "It is trained by this project with `tools/train_default_model.py` and stored in "
                 "the fla/HF RetNet layout (`config.json` + `model.safetensors`, bfloat16).\n")
    lines.append("## Model\n")
    lines.append("| | |\n|---|---|")
    lines.append("| architecture | fla `RetNetForCausalLM` (MSR with rotate-half rotary, "
                 "gamma_h = 1 - 2^(-5-h), raw retention, per-head RMSNorm + swish gate; SwiGLU MLP; untied lm_head) |")
    lines.append("| hidden_size / layers / heads | %d / %d / %d |" % (
        cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_heads"]))
    D, H = cfg["hidden_size"], cfg["num_heads"]
    lines.append("| d_k / d_v per head | %d / %d (expand_k %g, expand_v %g) |" % (
        int(D * cfg["expand_k"]) // H, int(D * cfg["expand_v"]) // H, cfg["expand_k"], cfg["expand_v"]))
    lines.append("| MLP intermediate size | %d |" % cfg["intermediate_size"])
    lines.append("| parameters | %s |" % format(nparams, ","))
    lines.append("| file | `model.safetensors`, %s bytes, all tensors BF16 |" % format(size, ","))
    lines.append("| tokenizer | bytes: ids 0..255 = raw UTF-8 bytes, 256 = `<s>` (BOS), 257 = `</s>` (EOS); vocab 258 |")
    lines.append("")
    lines.append("Tokenizer convention used in training: every corpus document (one Bible chapter, verse "
                 "references removed, one verse per line) is encoded as `<s>` + bytes + `</s>`; "
                 "documents are concatenated and %d-byte training windows are cut at random offsets, "
                 "so prompts work both with and without a leading `<s>`. Generation can stop at `</s>` "
                 "(end of a chapter).\n" % a.seq_len)
    lines.append("## Corpus\n")
    lines.append("- Text: %s, %d chapters, %s bytes as dumped." % (
        corpus["name"], ndocs, format(corpus["dump_bytes"], ",")))
    if pk:
        lines.append("- Debian 12 packages: %s (`apt-get install bible-kjv`; the script installs it "
                     "itself when run as root)." % pk)
    lines.append("- Files: %s; extracted with `%s`." % (
        ", ".join("`%s`" % f for f in corpus["files"]), corpus["extraction"]))
    lines.append("- sha256 of the dump: `%s`." % corpus["dump_sha256"])
    lines.append("- License: %s." % corpus["license"])
    lines.append("- Split: every %dth chapter is held out for validation: %s training tokens, "
                 "%s validation tokens (bytes + `<s>`/`</s>`).\n" % (
                     DEFAULTS["val_every"], format(ntrain, ","), format(nval, ",")))
    lines.append("## Recipe\n")
    lines.append("```\n/usr/bin/python3 tools/train_default_model.py --out %s --steps %d --seed %d\n```\n"
                 % ("model/default", a.steps, a.seed))
    lines.append("fp32 on CPU (torch 1.13, %d threads), parallel (causal decay-mask) form, "
                 "AdamW (betas 0.9/0.95, weight decay %g on matrices), peak lr %g, %d warmup steps, "
                 "cosine decay to %g, gradient clip %g, batch %d x %d bytes (%s tokens in total), "
                 "init N(0, 0.02) with o_proj/down_proj scaled by 1/sqrt(2L). Training took %.0f s "
                 "(%.0f s including evaluation and checks). Results are reproducible up to "
                 "floating-point reduction order (thread count).\n" % (
                     a.threads, DEFAULTS["weight_decay"], a.lr, a.warmup, a.lr * a.min_lr_frac,
                     DEFAULTS["grad_clip"], a.batch_size, a.seq_len,
                     format(a.steps * a.batch_size * a.seq_len, ","), train_time, total))
    lines.append("## Results\n")
    lines.append("| weights | train loss | val loss |\n|---|---|---|")
    lines.append("| fp32 (end of training) | %.4f nats/byte (%.3f bits/byte) | %.4f nats/byte (%.3f bits/byte) |"
                 % (tl, tl / L2, vl, vl / L2))
    lines.append("| bf16 (committed file) | %.4f nats/byte (%.3f bits/byte) | %.4f nats/byte (%.3f bits/byte) |"
                 % (tl16, tl16 / L2, vl16, vl16 / L2))
    lines.append("")
    lines.append("Train loss over 512 non-overlapping windows of the training stream, val loss over "
                 "the whole validation stream (%d-byte windows, no state carried across windows).\n" % a.seq_len)
    lines.append("Checks run by the script on the committed bf16 weights: parallel vs recurrent "
                 "logits over 128 validation tokens differ by at most %.1e; greedy decoding with the "
                 "recurrent form (token by token, positions continuing) equals greedy decoding with "
                 "the parallel form for every prompt below: %s.\n" % (dmax, "yes" if all_ok else "NO"))
    lines.append("## Samples (prompt preceded by `<s>`, 160 new bytes)\n")
    for kind, p, s in samples:
        lines.append("%s, prompt `%s`:\n" % (kind, p))
        lines.append("```\n%s%s\n```\n" % (p, s))
    with open(os.path.join(a.out, "README.md"), "w") as f:
        f.write("\n".join(lines))


if __name__ == "__main__":
    main()
