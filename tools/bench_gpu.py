#!/usr/bin/env python3
"""One benchmark run for the GPU fast path (issue #7), side by side, as one markdown table.

    bench_gpu.py --out DIR [--bench-bin build-gpu/bin/retnet-bench-model]   # GPU machine
    bench_gpu.py --device cpu --tiny --out /tmp/b --bench-bin build/bin/retnet-bench-model

For a ~350M RetNet (D 1024, 4 heads, 16 layers, SwiGLU 2048, vocab 50304, random weights in the
fla/HF layout, bf16) written to DIR/ckpt as config.json + model.safetensors:

  (a) this engine: retnet-bench-model --json on that checkpoint, three ways: the fast path
      (fused kernels + CUDA graphs), the fast path without graphs, and the reference path
      (eager LibTorch ops, RETNET's ModelOptions::Path::kReference);
  (b) an eager PyTorch implementation of the same checkpoint written here (and the same step
      captured in a CUDA graph), run in this process;
  (c) the bandwidth floor: (weights + B x 2 x state bytes) / measured device-copy bandwidth;
  (d) a same-size GPT-2-medium-shaped Transformer decode step (D 1024, 16 heads, 24 layers,
      vocab 50304, bf16) with a static KV cache holding 1k / 4k tokens, in a CUDA graph.

Decode: step time and tokens/s at B = 1, 8, 64, 256 (positions up to 4k, random state).
Prefill: tokens/s at T = 512, 2048 (B = 1). Correctness guard: the greedy tokens of (a) and (b)
for the first 32 steps after a 16-token prompt must be identical (the script exits 1 if not).
Everything is also written to DIR/results.json. --tiny shrinks the model for a CPU smoke run.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from safetensors_io import save_file  # noqa: E402

CONFIGS = {
    "350m": dict(d=1024, layers=16, heads=4, inter=2048, vocab=50304),
    "tiny": dict(d=64, layers=2, heads=2, inter=128, vocab=512),
}
TRANSFORMERS = {
    "350m": dict(d=1024, layers=24, heads=16, vocab=50304),
    "tiny": dict(d=64, layers=2, heads=4, vocab=512),
}
EPS = 1e-6


# ---------------------------------------------------------------------------------------------
# The checkpoint (fla/HF names, what model/checkpoint.cc reads)

def make_checkpoint(cfg, out_dir, seed, dtype):
    """Random weights like RetNet::CreateRandom: N(0,1) embeddings, N(0,1)/sqrt(fan_in)
    projections, norm gains 1 + 0.1 N(0,1). Returns the state dict (CPU, `dtype`)."""
    g = torch.Generator().manual_seed(seed)
    d, h, f, v = cfg["d"], cfg["heads"], cfg["inter"], cfg["vocab"]
    kd, vd = d, 2 * d

    def lin(rows, cols):
        return (torch.randn(rows, cols, generator=g) / math.sqrt(cols)).to(dtype)

    def gain(n):
        return (1.0 + 0.1 * torch.randn(n, generator=g)).to(dtype)

    sd = {"model.embeddings.weight": torch.randn(v, d, generator=g).to(dtype)}
    for i in range(cfg["layers"]):
        p = f"model.layers.{i}."
        sd[p + "attn_norm.weight"] = gain(d)
        sd[p + "attn.q_proj.weight"] = lin(kd, d)
        sd[p + "attn.k_proj.weight"] = lin(kd, d)
        sd[p + "attn.v_proj.weight"] = lin(vd, d)
        sd[p + "attn.g_proj.weight"] = lin(vd, d)
        sd[p + "attn.o_proj.weight"] = lin(d, vd)
        sd[p + "attn.g_norm_swish_gate.weight"] = gain(vd // h)
        sd[p + "mlp_norm.weight"] = gain(d)
        sd[p + "mlp.gate_proj.weight"] = lin(f, d)
        sd[p + "mlp.up_proj.weight"] = lin(f, d)
        sd[p + "mlp.down_proj.weight"] = lin(d, f)
    sd["model.norm.weight"] = gain(d)
    sd["lm_head.weight"] = lin(v, d)
    config = {
        "architectures": ["RetNetForCausalLM"], "model_type": "retnet", "attn_mode": "chunk",
        "hidden_size": d, "expand_k": 1.0, "expand_v": 2.0, "hidden_ratio": 2,
        "intermediate_size": f, "num_hidden_layers": cfg["layers"], "num_heads": h,
        "num_kv_heads": None, "feature_map": None, "hidden_act": "swish",
        "use_short_conv": False, "conv_size": 4, "use_output_gate": True,
        "max_position_embeddings": 8192, "elementwise_affine": True, "norm_eps": EPS,
        "attn": None, "tie_word_embeddings": False, "vocab_size": v,
        "torch_dtype": "bfloat16" if dtype == torch.bfloat16 else "float32",
        "tokenizer": "byte",
    }
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as fh:
        json.dump(config, fh, indent=2)
    save_file(sd, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    return sd


# ---------------------------------------------------------------------------------------------
# (b) eager PyTorch RetNet of that checkpoint; the same math and roundings as RetNet's
# reference path (model/retnet.cc): fp32 norms, rotary, decay, state and retention sums.

class EagerRetNet:
    def __init__(self, sd, cfg, device, dtype):
        self.cfg, self.device, self.dtype = cfg, device, dtype
        d, h = cfg["d"], cfg["heads"]
        self.h, self.dk, self.dv = h, d // h, 2 * d // h

        def w(name):
            return sd[name].to(device, dtype).contiguous()

        def n(name):
            return sd[name].to(device, torch.float32).contiguous()

        self.embed = w("model.embeddings.weight")
        self.norm = n("model.norm.weight")
        self.head = w("lm_head.weight")
        self.layers = []
        for i in range(cfg["layers"]):
            p = f"model.layers.{i}."
            self.layers.append({
                "attn_norm": n(p + "attn_norm.weight"),
                "q": w(p + "attn.q_proj.weight"), "k": w(p + "attn.k_proj.weight"),
                "v": w(p + "attn.v_proj.weight"), "g": w(p + "attn.g_proj.weight"),
                "o": w(p + "attn.o_proj.weight"),
                "gn": n(p + "attn.g_norm_swish_gate.weight"),
                "mlp_norm": n(p + "mlp_norm.weight"),
                "gate": w(p + "mlp.gate_proj.weight"), "up": w(p + "mlp.up_proj.weight"),
                "down": w(p + "mlp.down_proj.weight"),
            })
        hs = torch.arange(h, dtype=torch.float64)
        self.log_decay = torch.log1p(-torch.pow(2.0, -5.0 - hs)).to(torch.float32).to(device)
        half = self.dk // 2
        i = torch.arange(half, dtype=torch.float64)
        self.theta = torch.pow(10000.0, -2.0 * i / (2 * half)).to(torch.float32).to(device)
        self.scale = 1.0 / math.sqrt(self.dk)

    def param_bytes(self):
        t = [self.embed, self.head, self.norm]
        for layer in self.layers:
            t += list(layer.values())
        return sum(x.numel() * x.element_size() for x in t)

    def state_bytes(self):
        return self.cfg["layers"] * self.h * self.dk * self.dv * 4

    @staticmethod
    def rms(x, weight):
        xf = x.float()
        y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + EPS) * weight
        return y.to(x.dtype)

    def rotate(self, x, cos, sin):
        half = x.shape[-1] // 2
        a, b = x[..., :half], x[..., half:]
        return torch.cat([a * cos - b * sin, b * cos + a * sin], -1)

    def mix(self, layer, o, g):
        y = o * torch.rsqrt(o.square().mean(-1, keepdim=True) + EPS) * layer["gn"]  # fp32
        y = y.reshape(g.shape).to(g.dtype)
        return F.linear(F.silu(g) * y, layer["o"])

    def ffn(self, layer, x):
        h = self.rms(x, layer["mlp_norm"])
        return F.linear(F.silu(F.linear(h, layer["gate"])) * F.linear(h, layer["up"]),
                        layer["down"])

    def new_states(self, batch, scale=0.0):
        shape = (batch, self.h, self.dk, self.dv)
        if scale == 0.0:
            return [torch.zeros(shape, device=self.device) for _ in self.layers]
        return [torch.randn(shape, device=self.device) * scale for _ in self.layers]

    def step(self, tokens, positions, states):
        """tokens int64 [B], positions int64 [B] (device); states updated in place."""
        b = tokens.shape[0]
        h, dk, dv = self.h, self.dk, self.dv
        pos = positions.float()
        angle = pos.unsqueeze(1) * self.theta.unsqueeze(0)
        cos, sin = angle.cos().unsqueeze(1), angle.sin().unsqueeze(1)
        gamma = torch.exp(self.log_decay).view(1, h, 1, 1)
        x = self.embed.index_select(0, tokens)
        for layer, s in zip(self.layers, states):
            hn = self.rms(x, layer["attn_norm"])
            q = F.linear(hn, layer["q"]).float().view(b, h, dk)
            k = F.linear(hn, layer["k"]).float().view(b, h, dk)
            v = F.linear(hn, layer["v"]).float().view(b, h, dv)
            g = F.linear(hn, layer["g"])
            q = self.rotate(q, cos, sin) * self.scale
            k = self.rotate(k, cos, sin)
            s.mul_(gamma)
            s.view(b * h, dk, dv).baddbmm_(k.reshape(b * h, dk, 1), v.reshape(b * h, 1, dv))
            o = torch.bmm(q.reshape(b * h, 1, dk), s.view(b * h, dk, dv)).view(b, h, dv)
            x = x + self.mix(layer, o, g)
            x = x + self.ffn(layer, x)
        return F.linear(self.rms(x, self.norm), self.head).float()

    def prefill(self, tokens):
        """Parallel form over tokens [B, T] from position 0. Returns (last logits [B, V], states)."""
        b, t = tokens.shape
        h, dk, dv = self.h, self.dk, self.dv
        pos = torch.arange(t, device=self.device, dtype=torch.float32)
        angle = pos.unsqueeze(1) * self.theta.unsqueeze(0)
        cos, sin = angle.cos().view(1, t, 1, -1), angle.sin().view(1, t, 1, -1)
        idx = torch.arange(t, device=self.device, dtype=torch.float32)
        diff = idx.view(t, 1) - idx.view(1, t)
        lg = self.log_decay.view(h, 1, 1)
        mask = torch.exp(diff.clamp_min(0).unsqueeze(0) * lg) * (diff >= 0)
        k_decay = torch.exp((t - 1 - idx).view(1, t) * self.log_decay.view(h, 1)).unsqueeze(-1)
        x = self.embed.index_select(0, tokens.reshape(-1)).view(b, t, -1)
        states = []
        for layer in self.layers:
            hn = self.rms(x, layer["attn_norm"])
            q = F.linear(hn, layer["q"]).float().view(b, t, h, dk)
            k = F.linear(hn, layer["k"]).float().view(b, t, h, dk)
            v = F.linear(hn, layer["v"]).float().view(b, t, h, dv)
            g = F.linear(hn, layer["g"])
            q = (self.rotate(q, cos, sin) * self.scale).transpose(1, 2)
            k = self.rotate(k, cos, sin).transpose(1, 2)
            v = v.transpose(1, 2)
            o = torch.matmul(torch.matmul(q, k.transpose(-1, -2)) * mask, v)
            states.append(torch.matmul((k * k_decay).transpose(-1, -2), v).contiguous())
            x = x + self.mix(layer, o.transpose(1, 2), g)
            x = x + self.ffn(layer, x)
        logits = F.linear(self.rms(x[:, -1], self.norm), self.head).float()
        return logits, states


# ---------------------------------------------------------------------------------------------
# (d) GPT-2-medium-shaped Transformer decode step with a static KV cache

class StaticKvTransformer:
    def __init__(self, cfg, device, dtype, batch, context, seed):
        g = torch.Generator(device=device).manual_seed(seed)
        d, self.h, self.layers_n = cfg["d"], cfg["heads"], cfg["layers"]
        self.hd = d // self.h
        self.device = device

        def rnd(*shape, std):
            return (torch.randn(*shape, generator=g, device=device) * std).to(dtype)

        self.wte = rnd(cfg["vocab"], d, std=0.02)
        self.wpe = rnd(context, d, std=0.01)
        self.layers = [{
            "ln1": (torch.ones(d, device=device, dtype=dtype), torch.zeros(d, device=device, dtype=dtype)),
            "qkv": rnd(3 * d, d, std=d ** -0.5), "qkv_b": torch.zeros(3 * d, device=device, dtype=dtype),
            "proj": rnd(d, d, std=d ** -0.5), "proj_b": torch.zeros(d, device=device, dtype=dtype),
            "ln2": (torch.ones(d, device=device, dtype=dtype), torch.zeros(d, device=device, dtype=dtype)),
            "fc": rnd(4 * d, d, std=d ** -0.5), "fc_b": torch.zeros(4 * d, device=device, dtype=dtype),
            "out": rnd(d, 4 * d, std=(4 * d) ** -0.5), "out_b": torch.zeros(d, device=device, dtype=dtype),
        } for _ in range(self.layers_n)]
        self.lnf = (torch.ones(d, device=device, dtype=dtype), torch.zeros(d, device=device, dtype=dtype))
        shape = (batch, self.h, context, self.hd)
        self.k_cache = [rnd(*shape, std=1.0) for _ in range(self.layers_n)]
        self.v_cache = [rnd(*shape, std=1.0) for _ in range(self.layers_n)]

    def param_bytes(self):
        t = [self.wte, self.wpe]
        for layer in self.layers:
            for v in layer.values():
                t += list(v) if isinstance(v, tuple) else [v]
        return sum(x.numel() * x.element_size() for x in t)

    def step(self, tokens, pos):
        """tokens [B], pos int64 [1] (device): the slot the new token's K/V are written to."""
        b = tokens.shape[0]
        d = self.wte.shape[1]
        x = self.wte.index_select(0, tokens) + self.wpe.index_select(0, pos)
        for layer, kc, vc in zip(self.layers, self.k_cache, self.v_cache):
            hn = F.layer_norm(x, (d,), *layer["ln1"])
            q, k, v = F.linear(hn, layer["qkv"], layer["qkv_b"]).view(b, 3, self.h, 1, self.hd).unbind(1)
            kc.index_copy_(2, pos, k)
            vc.index_copy_(2, pos, v)
            if hasattr(F, "scaled_dot_product_attention"):
                a = F.scaled_dot_product_attention(q, kc, vc)
            else:  # torch < 2.0 (the CPU smoke run)
                a = torch.softmax((q @ kc.transpose(-1, -2)).float() / math.sqrt(self.hd), -1).to(q.dtype) @ vc
            x = x + F.linear(a.reshape(b, d), layer["proj"], layer["proj_b"])
            hn = F.layer_norm(x, (d,), *layer["ln2"])
            x = x + F.linear(F.gelu(F.linear(hn, layer["fc"], layer["fc_b"])), layer["out"], layer["out_b"])
        return F.linear(F.layer_norm(x, (d,), *self.lnf), self.wte).float()


# ---------------------------------------------------------------------------------------------
# Timing helpers

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_loop(fn, device, steps, reps=3, warmup=3):
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        sync(device)
        times.append((time.perf_counter() - t0) / steps)
    return sorted(times)[len(times) // 2]


def graphed(fn, device):
    """fn() captured in a CUDA graph (static inputs are whatever fn closes over); None on CPU."""
    if device.type != "cuda":
        return None
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def copy_bandwidth(device, nbytes):
    x = torch.empty(nbytes, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    t = time_loop(lambda: y.copy_(x), device, steps=10, reps=3, warmup=2)
    return 2.0 * nbytes / t  # read + write


def run_engine(args, ckpt, extra, prompt, label):
    out = os.path.join(args.out, f"engine_{label}.json")
    cmd = [args.bench_bin, "--checkpoint", ckpt, "--device", args.device, "--dtype", args.dtype,
           "--json", out, "--batches", ",".join(map(str, args.batches)),
           "--lengths", ",".join(map(str, args.lengths)), "--chunk-size", str(args.chunk_size),
           "--steps", str(args.steps), "--prompt-ids", ",".join(map(str, prompt)),
           "--greedy-steps", str(args.greedy_steps)] + extra
    print("+", " ".join(cmd), flush=True)
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       timeout=args.engine_timeout)
    with open(os.path.join(args.out, f"engine_{label}.log"), "w") as fh:
        fh.write(r.stdout)
    if r.returncode != 0:
        print(r.stdout[-4000:])
        raise RuntimeError(f"engine run '{label}' failed with exit code {r.returncode}")
    with open(out) as fh:
        return json.load(fh)


def fmt(x, digits=3, suffix=""):
    if x is None:
        return "-"
    return f"{x:.{digits}f}{suffix}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="output directory (checkpoint, logs, results)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--tiny", action="store_true", help="tiny model (CPU smoke run)")
    ap.add_argument("--bench-bin", default="build-gpu/bin/retnet-bench-model")
    ap.add_argument("--skip-engine", action="store_true", help="only (b), (c), (d)")
    ap.add_argument("--batches", default="1,8,64,256")
    ap.add_argument("--lengths", default="512,2048")
    ap.add_argument("--contexts", default="1024,4096")
    ap.add_argument("--chunk-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20, help="timed decode steps per repetition")
    ap.add_argument("--greedy-steps", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--engine-timeout", type=int, default=600)
    args = ap.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",") if b]
    args.lengths = [int(t) for t in args.lengths.split(",") if t]
    contexts = [int(c) for c in args.contexts.split(",") if c]
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    size = "tiny" if args.tiny else "350m"
    cfg = CONFIGS[size]
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 retention sums stay fp32, like the engine
    info = {"torch": torch.__version__, "device": str(device), "config": cfg, "dtype": args.dtype}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    print(json.dumps(info), flush=True)

    ckpt = os.path.join(args.out, "ckpt")
    t0 = time.time()
    sd = make_checkpoint(cfg, ckpt, args.seed, dtype)
    print(f"checkpoint written to {ckpt} in {time.time() - t0:.1f}s", flush=True)
    model = EagerRetNet(sd, cfg, device, dtype)
    del sd
    g = torch.Generator().manual_seed(args.seed + 1)
    prompt = torch.randint(cfg["vocab"], (16,), generator=g).tolist()
    results = {"info": info, "prompt": prompt}

    # (c) bandwidth floor
    bw = copy_bandwidth(device, (1 << 30) if device.type == "cuda" else (64 << 20))
    w_bytes, s_bytes = model.param_bytes(), model.state_bytes()
    results["bandwidth_Bps"] = bw
    results["weight_bytes"], results["state_bytes"] = w_bytes, s_bytes
    print(f"copy bandwidth {bw / 1e12:.3f} TB/s; weights {w_bytes / 1e6:.1f} MB; "
          f"state {s_bytes / 1e6:.2f} MB/session", flush=True)

    # (b) eager PyTorch: greedy tokens, decode, prefill
    with torch.inference_mode():
        logits, states = model.prefill(torch.tensor([prompt], device=device))
        greedy_b = []
        for i in range(args.greedy_steps):
            tok = logits.argmax(-1)
            greedy_b.append(int(tok.item()))
            logits = model.step(tok, torch.full((1,), len(prompt) + i, device=device, dtype=torch.long), states)
        del states
        results["greedy_b"] = greedy_b
        decode_b = {}
        for b in args.batches:
            states = model.new_states(b, 0.01)
            tokens = torch.randint(cfg["vocab"], (b,), device=device)
            positions = torch.randint(4096, (b,), device=device)
            eager = time_loop(lambda: model.step(tokens, positions, states), device, args.steps)
            replay = graphed(lambda: model.step(tokens, positions, states), device)
            graph = time_loop(replay, device, args.steps) if replay is not None else None
            decode_b[b] = {"eager_s": eager, "graph_s": graph}
            print(f"(b) decode B={b}: eager {eager * 1e3:.3f} ms, graph "
                  f"{fmt(graph * 1e3 if graph else None)} ms", flush=True)
            del states, replay
            if device.type == "cuda":
                torch.cuda.empty_cache()
        prefill_b = {}
        for t in args.lengths:
            tokens = torch.randint(cfg["vocab"], (1, t), device=device)
            sec = time_loop(lambda: model.prefill(tokens), device, steps=1, reps=5, warmup=2)
            prefill_b[t] = sec
            print(f"(b) prefill T={t}: {sec * 1e3:.3f} ms ({t / sec:.0f} tok/s)", flush=True)
    results["decode_b"], results["prefill_b"] = decode_b, prefill_b
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # (d) Transformer with a static KV cache, CUDA graph
    tcfg = TRANSFORMERS[size]
    decode_d = {}
    with torch.inference_mode():
        for ctx in contexts:
            for b in args.batches:
                kv_bytes = 2 * tcfg["layers"] * b * ctx * tcfg["d"] * 2
                if kv_bytes > 40e9:
                    continue  # B=256 at 4k would need 100 GB of KV cache
                tr = StaticKvTransformer(tcfg, device, dtype, b, ctx, args.seed)
                tokens = torch.randint(tcfg["vocab"], (b,), device=device)
                pos = torch.full((1,), ctx - 1, device=device, dtype=torch.long)
                replay = graphed(lambda: tr.step(tokens, pos), device)
                fn = replay if replay is not None else (lambda: tr.step(tokens, pos))
                sec = time_loop(fn, device, args.steps)
                decode_d[(ctx, b)] = {"step_s": sec, "graph": replay is not None,
                                      "params_bytes": tr.param_bytes(), "kv_bytes": kv_bytes}
                print(f"(d) transformer ctx={ctx} B={b}: {sec * 1e3:.3f} ms/step", flush=True)
                del tr, replay, fn
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    results["decode_d"] = {f"{c}x{b}": v for (c, b), v in decode_d.items()}

    # (a) the engine
    engine = {}
    if not args.skip_engine:
        runs = [("fast", ["--path", "fast"]), ("fast_nograph", ["--path", "fast", "--no-graphs"]),
                ("reference", ["--path", "reference"])]
        for label, extra in runs:
            engine[label] = run_engine(args, ckpt, extra, prompt, label)
    results["engine"] = engine

    # Greedy guard
    matches = {}
    for label, r in engine.items():
        got = r.get("greedy", [])
        n = 0
        while n < min(len(got), len(greedy_b)) and got[n] == greedy_b[n]:
            n += 1
        matches[label] = n
    results["greedy_match"] = matches

    # Table
    floor = {b: (w_bytes + b * 2 * s_bytes) / bw for b in args.batches}
    lines = [f"# GPU fast path benchmark ({info.get('gpu', args.device)}, torch {torch.__version__}, "
             f"{args.dtype} weights, fp32 state)", "",
             f"Model: RetNet D {cfg['d']}, {cfg['heads']} heads, {cfg['layers']} layers, SwiGLU "
             f"{cfg['inter']}, vocab {cfg['vocab']}: {w_bytes / 1e6:.0f} MB of weights, "
             f"{s_bytes / 1e6:.1f} MB of state per session. Copy bandwidth {bw / 1e12:.2f} TB/s.", "",
             "## Decode (ms per step; tokens/s in brackets)", "",
             "| B | (a) fused + graph | (a) fused, no graph | (a) reference | (b) eager PyTorch | "
             "(b) in a CUDA graph | (c) floor | (a)/(b eager) | (a)/(b graph) | floor/(a) |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def eng(label, key, b):
        for row in engine.get(label, {}).get(key, []):
            if row.get("batch") == b or row.get("length") == b:
                return row
        return None

    for b in args.batches:
        a = eng("fast", "decode", b)
        an = eng("fast_nograph", "decode", b)
        ar = eng("reference", "decode", b)
        be, bg = decode_b[b]["eager_s"], decode_b[b]["graph_s"]

        def cell(sec):
            return "-" if sec is None else f"{sec * 1e3:.3f} ({b / sec:,.0f})"
        a_s = a["step_s"] if a else None
        lines.append(
            f"| {b} | {cell(a_s)} | {cell(an['step_s'] if an else None)} | "
            f"{cell(ar['step_s'] if ar else None)} | {cell(be)} | {cell(bg)} | {floor[b] * 1e3:.3f} | "
            f"{fmt(be / a_s if a_s else None, 1, 'x')} | "
            f"{fmt(bg / a_s if (a_s and bg) else None, 1, 'x')} | "
            f"{fmt(100 * floor[b] / a_s if a_s else None, 0, '%')} |")
    lines += ["", "## Prefill (B = 1; tokens/s)", "",
              f"| T | (a) fast chunkwise C={args.chunk_size} | (a) reference chunkwise | "
              "(b) eager parallel | (a)/(b) |", "|---:|---:|---:|---:|---:|"]
    for t in args.lengths:
        a = eng("fast", "prefill", t)
        ar = eng("reference", "prefill", t)
        bt = t / prefill_b[t]
        at_ = a["tokens_per_s"] if a else None
        lines.append(f"| {t} | {fmt(at_, 0)} | {fmt(ar['tokens_per_s'] if ar else None, 0)} | "
                     f"{bt:.0f} | {fmt(at_ / bt if at_ else None, 2, 'x')} |")
    lines += ["", f"## Against a same-size Transformer (GPT-2-medium shape, {tcfg['layers']} layers, "
              "static KV cache, CUDA graph)", "",
              "| B | context | (d) Transformer ms/step (tok/s) | (a) RetNet ms/step (tok/s) | "
              "(a)/(d) tokens/s |", "|---:|---:|---:|---:|---:|"]
    for (ctx, b), v in sorted(decode_d.items()):
        a = eng("fast", "decode", b)
        a_s = a["step_s"] if a else None
        lines.append(f"| {b} | {ctx} | {v['step_s'] * 1e3:.3f} ({b / v['step_s']:,.0f}) | "
                     f"{'-' if a_s is None else f'{a_s * 1e3:.3f} ({b / a_s:,.0f})'} | "
                     f"{fmt(v['step_s'] / a_s if a_s else None, 2, 'x')} |")
    lines += ["", "## Correctness guard", "",
              f"Greedy tokens after a 16-token prompt, {args.greedy_steps} steps, (b) = {greedy_b[:8]}...:"]
    for label, n in matches.items():
        lines.append(f"- (a) {label}: first {n} of {args.greedy_steps} identical to (b)"
                     + ("" if n == args.greedy_steps else "  **MISMATCH**"))
    if not engine:
        lines.append("- (a) not run (--skip-engine)")
    table = "\n".join(lines) + "\n"
    print("\n" + table)
    with open(os.path.join(args.out, "table.md"), "w") as fh:
        fh.write(table)
    with open(os.path.join(args.out, "results.json"), "w") as fh:
        json.dump(results, fh, indent=1, default=str)
    ok = all(n == args.greedy_steps for n in matches.values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
