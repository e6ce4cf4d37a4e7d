#!/usr/bin/python3
"""A plain eager PyTorch RetNet (fla/HF layout), fp32, batched recurrent decode.

The baseline of scripts/bench-hotpath.sh: what someone would write in an afternoon with
torch.nn — nn.Linear layers, rotate-half rotary, S = gamma * S + k v^T, o = q S, per-head RMS
group norm, swish gate, SwiGLU FFN — no fusion, no preallocated buffers, no custom kernels.
It loads a checkpoint directory in this project's format (config.json + model.safetensors,
tools/safetensors_io.py) of the fla family (model_type "retnet": model/default/ and the random
~125M / state-heavy checkpoints the benchmark writes).

    from eager_retnet import EagerRetNet
    m = EagerRetNet.from_dir("model/default")
    state = m.new_state(batch)                       # list of [B, H, d_k, d_v] fp32, one per layer
    logits = m.step(tokens, positions, state)        # tokens, positions int64 [B]; state in place
    ids = m.greedy(prompt_ids, 32)                   # greedy continuation (batch 1)

    eager_retnet.py DIR --prompt-ids 1,2,3 --steps 32    # prints the greedy ids
"""

import argparse
import json
import math
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from safetensors_io import load_file  # noqa: E402


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def _linear(rows, cols):
    return nn.Linear(cols, rows, bias=False)


class Retention(nn.Module):
    def __init__(self, d, key_dim, value_dim, heads, eps):
        super().__init__()
        self.h, self.dk, self.dv = heads, key_dim // heads, value_dim // heads
        self.q_proj = _linear(key_dim, d)
        self.k_proj = _linear(key_dim, d)
        self.v_proj = _linear(value_dim, d)
        self.g_proj = _linear(value_dim, d)
        self.o_proj = _linear(d, value_dim)
        self.g_norm = RMSNorm(self.dv, eps)  # shared across heads
        # fla: gamma_h = 1 - 2^(-5-h); rotate-half theta_i = 10000^(-2i/d_k)
        hs = torch.arange(heads, dtype=torch.float32)
        self.register_buffer("gamma", 1.0 - torch.pow(2.0, -5.0 - hs))
        self.register_buffer(
            "theta", 1.0 / (10000 ** (torch.arange(0, self.dk, 2, dtype=torch.float32) / self.dk)))

    def rotate(self, x, cos, sin):  # x [B, H, d_k]; cos/sin [B, 1, d_k/2]
        half = self.dk // 2
        a, b = x[..., :half], x[..., half:]
        return torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)

    def forward(self, x, positions, s):
        """x [B, D], positions int64 [B], s [B, H, d_k, d_v] (updated in place)."""
        b = x.shape[0]
        q = self.q_proj(x).view(b, self.h, self.dk)
        k = self.k_proj(x).view(b, self.h, self.dk)
        v = self.v_proj(x).view(b, self.h, self.dv)
        g = self.g_proj(x)
        angle = positions.to(torch.float32)[:, None, None] * self.theta  # [B, 1, d_k/2]
        cos, sin = torch.cos(angle), torch.sin(angle)
        q = self.rotate(q, cos, sin) * (self.dk ** -0.5)
        k = self.rotate(k, cos, sin)
        # S = gamma * S + k v^T ; o = q S
        s.mul_(self.gamma.view(1, -1, 1, 1)).add_(k.unsqueeze(-1) * v.unsqueeze(-2))
        o = torch.matmul(q.unsqueeze(-2), s).squeeze(-2)  # [B, H, d_v]
        o = self.g_norm(o).reshape(b, self.h * self.dv)
        return self.o_proj(F.silu(g) * o)


class SwiGLU(nn.Module):
    def __init__(self, d, inter):
        super().__init__()
        self.gate_proj = _linear(inter, d)
        self.up_proj = _linear(inter, d)
        self.down_proj = _linear(d, inter)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, d, key_dim, value_dim, heads, inter, eps):
        super().__init__()
        self.attn_norm = RMSNorm(d, eps)
        self.attn = Retention(d, key_dim, value_dim, heads, eps)
        self.mlp_norm = RMSNorm(d, eps)
        self.mlp = SwiGLU(d, inter)

    def forward(self, x, positions, s):
        x = x + self.attn(self.attn_norm(x), positions, s)
        return x + self.mlp(self.mlp_norm(x))


class EagerRetNet(nn.Module):
    def __init__(self, config, state_dict):
        super().__init__()
        if "model.embeddings.weight" not in state_dict:
            raise ValueError("eager_retnet: only the fla/HF layout (model.embeddings.weight, "
                             "model.layers.N.attn.*) is implemented")
        for key, ok in (("use_short_conv", False), ("feature_map", None), ("attn", None)):
            if config.get(key, ok) != ok:
                raise ValueError(f"eager_retnet: unsupported {key}={config.get(key)!r}")
        sd = {k: v.to(torch.float32) for k, v in state_dict.items()}
        vocab, d = sd["model.embeddings.weight"].shape
        heads = int(config["num_heads"])
        eps = float(config.get("norm_eps", 1e-6))
        n_layers = int(config["num_hidden_layers"])
        key_dim = sd["model.layers.0.attn.q_proj.weight"].shape[0]
        value_dim = sd["model.layers.0.attn.v_proj.weight"].shape[0]
        inter = sd["model.layers.0.mlp.down_proj.weight"].shape[1]
        self.config = dict(vocab=vocab, d=d, heads=heads, layers=n_layers, key_dim=key_dim,
                           value_dim=value_dim, inter=inter)
        self.embeddings = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(
            Block(d, key_dim, value_dim, heads, inter, eps) for _ in range(n_layers))
        self.norm = RMSNorm(d, eps)
        self.tied = "lm_head.weight" not in sd
        self.lm_head = None if self.tied else _linear(vocab, d)

        mine = {"embeddings.weight": sd.pop("model.embeddings.weight"),
                "norm.weight": sd.pop("model.norm.weight")}
        if not self.tied:
            mine["lm_head.weight"] = sd.pop("lm_head.weight")
        for i in range(n_layers):
            p = f"model.layers.{i}."
            gn = p + "attn.g_norm_swish_gate.weight"
            if gn not in sd:
                gn = p + "attn.g_norm.weight"
            mine[f"layers.{i}.attn.g_norm.weight"] = sd.pop(gn)
            gate = sd.pop(p + "mlp.gate_proj.weight")
            if p + "mlp.up_proj.weight" in sd:
                up = sd.pop(p + "mlp.up_proj.weight")
            else:  # legacy fused gate_proj: rows [0, I) gate, [I, 2I) up
                gate, up = gate[:inter], gate[inter:]
            mine[f"layers.{i}.mlp.gate_proj.weight"] = gate
            mine[f"layers.{i}.mlp.up_proj.weight"] = up
            for name in ("attn_norm", "mlp_norm"):
                mine[f"layers.{i}.{name}.weight"] = sd.pop(p + name + ".weight")
            for name in ("q_proj", "k_proj", "v_proj", "g_proj", "o_proj"):
                mine[f"layers.{i}.attn.{name}.weight"] = sd.pop(p + f"attn.{name}.weight")
            mine[f"layers.{i}.mlp.down_proj.weight"] = sd.pop(p + "mlp.down_proj.weight")
        if sd:
            raise ValueError(f"eager_retnet: unused tensors {sorted(sd)[:8]}")
        missing, unexpected = self.load_state_dict(mine, strict=False)
        missing = [k for k in missing if not k.endswith(("gamma", "theta"))]
        if missing or unexpected:
            raise ValueError(f"eager_retnet: missing {missing}, unexpected {unexpected}")
        self.eval()
        self.requires_grad_(False)

    @classmethod
    def from_dir(cls, ckpt_dir):
        with open(os.path.join(ckpt_dir, "config.json")) as f:
            config = json.load(f)
        if config.get("model_type", "retnet") != "retnet":
            raise ValueError("eager_retnet: only fla/HF checkpoints (model_type retnet)")
        return cls(config, load_file(os.path.join(ckpt_dir, "model.safetensors")))

    def state_bytes_per_session(self):
        c = self.config
        return c["layers"] * c["key_dim"] * (c["value_dim"] // c["heads"]) * 4

    def new_state(self, batch, scale=0.0):
        shapes = [(batch, l.attn.h, l.attn.dk, l.attn.dv) for l in self.layers]
        if scale == 0.0:
            return [torch.zeros(s) for s in shapes]
        return [torch.randn(s) * scale for s in shapes]

    def step(self, tokens, positions, state):
        """One batched recurrent step: tokens, positions int64 [B]; returns logits [B, V]."""
        x = self.embeddings(tokens)
        for layer, s in zip(self.layers, state):
            x = layer(x, positions, s)
        x = self.norm(x)
        return F.linear(x, self.embeddings.weight) if self.tied else self.lm_head(x)

    def greedy(self, prompt, steps):
        """Greedy continuation of `prompt` (a list of ids), batch 1; the prompt is fed token by
        token through the recurrent step."""
        with torch.inference_mode():
            state = self.new_state(1)
            logits = None
            for i, t in enumerate(prompt):
                logits = self.step(torch.tensor([t]), torch.tensor([i]), state)
            out = []
            for k in range(steps):
                tok = int(logits[0].argmax())
                out.append(tok)
                logits = self.step(torch.tensor([tok]), torch.tensor([len(prompt) + k]), state)
            return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--prompt-ids", required=True, help="comma-separated prompt token ids")
    ap.add_argument("--steps", type=int, default=32)
    args = ap.parse_args(argv)
    model = EagerRetNet.from_dir(args.checkpoint)
    print(",".join(map(str, model.greedy([int(t) for t in args.prompt_ids.split(",")],
                                         args.steps))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
