#!/usr/bin/python3
"""Independent, readable reference implementation of RetNet inference.

Written from /work/shared/reference/retnet-spec.md (no upstream code is
copied).  It loads a checkpoint directory in the project format
(``config.json`` + ``model.safetensors``) of any supported family and runs the
parallel, recurrent or chunkwise form in float64 (for goldens) or float32.

Families (detected from the tensor names, cross-checked with config.json):

* ``fla``        flash-linear-attention / HF (model_type "retnet"):
                 ``model.embeddings.weight``, ``model.layers.N.attn.*``.
                 Rotate-half rotary, 1/sqrt(d_k) on q, raw retention,
                 per-head RMSNorm(d_v, norm_eps) with a shared affine weight,
                 swish gate, SwiGLU MLP (current split or legacy fused
                 ``gate_proj`` of 2I rows).
* ``torchscale`` Microsoft torchscale (``[decoder.]layers.N.retention.*``)
                 and syncdoth/RetNet (``model.layers.N.retention.*`` +
                 ``lm_head.weight``).  Interleaved rotary, 1/sqrt(d_k) on k,
                 alpha_n = 1/sqrt(c_n) row normalisation.  Two layouts:
                 "head" (Sep 2023+: RMSNorm, GLU FFN, no biases, group norm
                 RMSNorm(d_v, layernorm_eps) without affine) and "v1"
                 (Jul 2023: LayerNorm with bias, biases on projections,
                 fc1 -> act -> ffn_layernorm -> fc2, group norm LayerNorm(d_v)
                 without affine, eps 1e-6: upstream's MultiScaleRetention
                 hard-codes it, whatever layernorm_eps says).  v1 is recognised by the presence
                 of ``retention.q_proj.bias``.
* ``seed``       myscience/retnet-pytorch (``layers.N.0.*``, ``layers.N.1.*``):
                 features in/out, LayerNorms eps 1e-5 with bias, biases on all
                 Linears, per-head LayerNorm with shared affine, msr_gate_fn
                 gate, MLP with an activation after every Linear, raw
                 retention, always causal.

Usage:
    retnet_ref.py --self-test            # parallel == recurrent == chunkwise
                                         # for every golden case + sensitivity
    model = load_model("DIR/case", dtype=torch.float64)
    out = model.forward(tokens_or_features, mode="parallel")
"""

import argparse
import copy
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from safetensors_io import load_file  # noqa: E402

__all__ = ["RetNetRef", "load_model", "build_model", "detect_family",
           "default_log_decay", "lm_log_decay", "interleaved_angle_buffer"]


# ---------------------------------------------------------------------------
# Small building blocks
# ---------------------------------------------------------------------------

def _silu(x):
    return x * torch.sigmoid(x)


def _gelu(x):
    # Exact (erf) GELU, as torch.nn.functional.gelu's default.
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _relu(x):
    return torch.clamp(x, min=0)


ACTIVATIONS = {"swish": _silu, "silu": _silu, "gelu": _gelu, "relu": _relu}


def activation(name):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unsupported activation {name!r}") from None


class Linear:
    """y = x W^T (+ b)."""

    def __init__(self, weight, bias=None):
        self.weight = weight
        self.bias = bias

    def __call__(self, x):
        y = x @ self.weight.t()
        return y if self.bias is None else y + self.bias

    @property
    def out_features(self):
        return self.weight.shape[0]


class Norm:
    """RMSNorm or LayerNorm over the last dimension (optional affine)."""

    def __init__(self, kind, eps, weight=None, bias=None):
        if kind not in ("rms", "ln"):
            raise ValueError(kind)
        self.kind, self.eps, self.weight, self.bias = kind, eps, weight, bias

    def __call__(self, x):
        if self.kind == "rms":
            y = x * torch.rsqrt((x * x).mean(-1, keepdim=True) + self.eps)
        else:
            mu = x.mean(-1, keepdim=True)
            var = ((x - mu) ** 2).mean(-1, keepdim=True)  # biased variance
            y = (x - mu) * torch.rsqrt(var + self.eps)
        if self.weight is not None:
            y = y * self.weight
        if self.bias is not None:
            y = y + self.bias
        return y


class GatedFFN:
    """out(act(a x) * (l x)): fla SwiGLU (gate/up/down) and torchscale GLU
    (fc1 = activated branch, gate = linear branch, fc2)."""

    def __init__(self, w_act, w_lin, w_out, act):
        self.w_act, self.w_lin, self.w_out = w_act, w_lin, w_out
        self.act = activation(act)

    def __call__(self, x):
        return self.w_out(self.act(self.w_act(x)) * self.w_lin(x))


class PlainFFN:
    """torchscale v1: fc2(inner_norm(act(fc1 x))), inner_norm optional."""

    def __init__(self, fc1, fc2, act, inner_norm=None):
        self.fc1, self.fc2, self.inner_norm = fc1, fc2, inner_norm
        self.act = activation(act)

    def __call__(self, x):
        h = self.act(self.fc1(x))
        if self.inner_norm is not None:
            h = self.inner_norm(h)
        return self.fc2(h)


class SeedMLP:
    """seed MLP after its LayerNorm: act after EVERY Linear (incl. last)."""

    def __init__(self, linears, act):
        self.linears = linears
        self.act = activation(act)

    def __call__(self, x):
        for lin in self.linears:
            x = self.act(lin(x))
        return x


class Layer:
    """Weights and options of one block (retention half + FFN half)."""

    def __init__(self):
        self.attn_norm = None   # Norm
        self.q = self.k = self.v = self.g = self.o = None  # Linear
        self.group_norm = None  # Norm over d_v, shared across heads
        self.log_decay = None   # [H] log gamma (float32 values)
        self.theta = None       # [d_k/2] rotary frequencies (float32)
        self.ffn_norm = None    # Norm
        self.ffn = None         # callable


# ---------------------------------------------------------------------------
# Decay and rotary tables (computed in float32, as the references do)
# ---------------------------------------------------------------------------

def default_log_decay(num_heads):
    """log gamma_h = log(1 - 2^(-5-h)), float32."""
    h = torch.arange(num_heads, dtype=torch.float32)
    return torch.log(1 - torch.pow(torch.tensor(2.0), -5.0 - h))


def lm_log_decay(num_heads):
    """Paper / syncdoth use_lm_decay: gamma = 1 - exp(linspace(log 1/32,
    log 1/512, H)), float32."""
    s = torch.linspace(math.log(1 / 32), math.log(1 / 512), num_heads)
    return torch.log(1 - torch.exp(s))


def interleaved_theta(d_k):
    """theta_i = 1 / 10000^(linspace(0, 1, d_k/2)), float32."""
    return 1.0 / (10000 ** torch.linspace(0, 1, d_k // 2))


def interleaved_angle_buffer(d_k):
    """torchscale/seed ``angle`` buffer: [t0, t0, t1, t1, ...] (float32)."""
    return interleaved_theta(d_k).unsqueeze(-1).repeat(1, 2).flatten()


def half_theta(d_k):
    """fla rotate-half: theta_i = 10000^(-2i/d_k), float32."""
    return 1.0 / (10000 ** (torch.arange(0, d_k, 2, dtype=torch.float32)
                            / d_k))


# ---------------------------------------------------------------------------
# Retention kernels on per-head tensors: q, k [B, H, T, d_k], v [B, H, T, d_v]
# (rotary and 1/sqrt(d_k) already applied), log_decay [H].  Raw retention
# o_n = sum_{m<=n} gamma^(n-m) (q_n . k_m) v_m; row normalisation is applied
# by the caller.
# ---------------------------------------------------------------------------

def _decay_mask(t, log_decay, dtype):
    """[H, t, t] mask gamma^(n-m) for n >= m else 0."""
    n = torch.arange(t, dtype=dtype)
    diff = n[:, None] - n[None, :]
    lg = log_decay.to(dtype)[:, None, None]
    mask = torch.exp(diff.clamp(min=0)[None] * lg)
    return torch.where(diff[None] >= 0, mask, torch.zeros((), dtype=dtype))


def retention_parallel(q, k, v, log_decay):
    mask = _decay_mask(q.shape[2], log_decay, q.dtype)
    return ((q @ k.transpose(-1, -2)) * mask) @ v


def retention_recurrent(q, k, v, log_decay, state=None):
    """Token by token: S_n = gamma S_{n-1} + k_n v_n^T; o_n = q_n S_n.
    Returns (o, final state [B, H, d_k, d_v])."""
    b, h, t, dk = q.shape
    dv = v.shape[-1]
    gamma = torch.exp(log_decay.to(q.dtype))[None, :, None, None]
    s = torch.zeros(b, h, dk, dv, dtype=q.dtype) if state is None else state
    out = torch.empty(b, h, t, dv, dtype=q.dtype)
    for n in range(t):
        s = gamma * s + k[:, :, n, :, None] * v[:, :, n, None, :]
        out[:, :, n] = (q[:, :, n, None, :] @ s)[:, :, 0]
    return out, s


def retention_chunkwise(q, k, v, log_decay, chunk_size, state=None):
    """Chunkwise form (spec 1.2); the last chunk may be shorter and is run
    with its real length (no padding, so the state is exact)."""
    b, h, t, dk = q.shape
    dv = v.shape[-1]
    lg = log_decay.to(q.dtype)
    s = torch.zeros(b, h, dk, dv, dtype=q.dtype) if state is None else state
    out = torch.empty(b, h, t, dv, dtype=q.dtype)
    for start in range(0, t, chunk_size):
        end = min(start + chunk_size, t)
        c = end - start
        qc, kc, vc = q[:, :, start:end], k[:, :, start:end], v[:, :, start:end]
        r = torch.arange(c, dtype=q.dtype)
        inner = ((qc @ kc.transpose(-1, -2))
                 * _decay_mask(c, lg, q.dtype)) @ vc
        q_decay = torch.exp((r[None, :] + 1) * lg[:, None])      # [H, c]
        cross = (qc * q_decay[None, :, :, None]) @ s
        out[:, :, start:end] = inner + cross
        k_decay = torch.exp((c - 1 - r[None, :]) * lg[:, None])  # [H, c]
        s = (torch.exp(c * lg)[None, :, None, None] * s
             + (kc * k_decay[None, :, :, None]).transpose(-1, -2) @ vc)
    return out, s


def row_scale(alpha_mode, log_decay, positions, dtype):
    """Per-(head, row) factor alpha [H, T] applied before the group norm.

    raw:    1 (fla, seed)
    sqrt_c: 1/sqrt(c_n), c_n = (1 - gamma^(n+1)) / (1 - gamma)
            (torchscale, syncdoth), n = 0-based absolute position."""
    if alpha_mode == "raw":
        return None
    if alpha_mode != "sqrt_c":
        raise ValueError(alpha_mode)
    lg = log_decay.to(torch.float64)[:, None]
    n = positions.to(torch.float64)[None, :]
    c = torch.expm1((n + 1) * lg) / torch.expm1(lg)
    return c.rsqrt().to(dtype)


# ---------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------

class RetNetRef:
    """Reference RetNet (one family); see load_model / build_model."""

    def __init__(self):
        self.family = None        # "fla" | "torchscale" | "seed"
        self.layout = None        # fla: "split"/"fused"; ts: "head"/"v1"
        self.num_heads = 0
        self.d_k = self.d_v = 0
        self.rotary = None        # "interleaved" | "half"
        self.scale_on = None      # "q" | "k"
        self.alpha_mode = None    # "raw" | "sqrt_c"
        self.gate_act = None      # activation name
        self.normalize_before = True
        self.residual_alpha = 1.0  # deepnorm alpha multiplies the skip path
        self.embed = None         # [V, D] or None (seed)
        self.embed_scale = 1.0
        self.embed_norm = None
        self.final_norm = None
        self.head = None          # Linear or None (seed); tied -> embed
        self.layers = []
        self.dtype = torch.float64

    # -- pieces --------------------------------------------------------------

    def _rotate(self, x, theta, positions):
        """Rotate pairs of the last dim of x [B, H, T, d_k]."""
        ang = positions.to(torch.float32)[:, None] * theta[None, :]  # fp32
        cos = torch.cos(ang.to(self.dtype))
        sin = torch.sin(ang.to(self.dtype))
        if self.rotary == "interleaved":
            a, b = x[..., 0::2], x[..., 1::2]
            ra, rb = a * cos - b * sin, b * cos + a * sin
            return torch.stack((ra, rb), dim=-1).flatten(-2)
        if self.rotary == "half":
            half = x.shape[-1] // 2
            a, b = x[..., :half], x[..., half:]
            return torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)
        raise ValueError(self.rotary)

    def _retention(self, layer, x, mode, chunk_size, positions, stats):
        bsz, t, _ = x.shape
        h, dk, dv = self.num_heads, self.d_k, self.d_v
        q = layer.q(x).view(bsz, t, h, dk).transpose(1, 2)
        k = layer.k(x).view(bsz, t, h, dk).transpose(1, 2)
        v = layer.v(x).view(bsz, t, h, dv).transpose(1, 2)
        g = layer.g(x)
        if self.scale_on == "k":
            k = k * dk ** -0.5
        elif self.scale_on == "q":
            q = q * dk ** -0.5
        else:
            raise ValueError(self.scale_on)
        q = self._rotate(q, layer.theta, positions)
        k = self._rotate(k, layer.theta, positions)
        if mode == "parallel":
            o = retention_parallel(q, k, v, layer.log_decay)
        elif mode == "recurrent":
            o, _ = retention_recurrent(q, k, v, layer.log_decay)
        elif mode == "chunkwise":
            if not chunk_size or chunk_size < 1:
                raise ValueError("chunkwise mode needs chunk_size >= 1")
            o, _ = retention_chunkwise(q, k, v, layer.log_decay, chunk_size)
        else:
            raise ValueError(f"unknown mode {mode!r}")
        alpha = row_scale(self.alpha_mode, layer.log_decay, positions,
                          self.dtype)
        if alpha is not None:
            o = o * alpha[None, :, :, None]
        if stats is not None:
            stats.append(o.pow(2).mean().item())
        o = layer.group_norm(o)                       # per head over d_v
        o = o.transpose(1, 2).reshape(bsz, t, h * dv)
        return layer.o(activation(self.gate_act)(g) * o)

    def _block(self, layer, x, mode, chunk_size, positions, stats):
        a = self.residual_alpha
        if self.normalize_before:
            x = a * x + self._retention(layer, layer.attn_norm(x), mode,
                                        chunk_size, positions, stats)
            return a * x + layer.ffn(layer.ffn_norm(x))
        x = layer.attn_norm(a * x + self._retention(layer, x, mode,
                                                    chunk_size, positions,
                                                    stats))
        return layer.ffn_norm(a * x + layer.ffn(x))

    # -- public --------------------------------------------------------------

    @property
    def takes_tokens(self):
        return self.embed is not None

    @property
    def output_name(self):
        return "logits" if self.takes_tokens else "hidden"

    def forward(self, inputs, mode="parallel", chunk_size=None, stats=None):
        """inputs: int64 tokens [B, T] (language models) or float features
        [B, T, D] (seed).  Returns logits [B, T, V] or hidden [B, T, D] in
        self.dtype.  ``stats`` (a list) receives mean(o^2) per layer."""
        if self.takes_tokens:
            if inputs.dtype != torch.int64 or inputs.dim() != 2:
                raise ValueError("expected int64 tokens [B, T]")
            x = self.embed[inputs] * self.embed_scale
            if self.embed_norm is not None:
                x = self.embed_norm(x)
        else:
            if not inputs.is_floating_point() or inputs.dim() != 3:
                raise ValueError("expected float features [B, T, D]")
            x = inputs.to(self.dtype)
        positions = torch.arange(x.shape[1])
        for layer in self.layers:
            x = self._block(layer, x, mode, chunk_size, positions, stats)
        if self.final_norm is not None:
            x = self.final_norm(x)
        if not self.takes_tokens:
            return x
        if self.head is None:
            return x @ self.embed.t()
        return self.head(x)


# ---------------------------------------------------------------------------
# Loading: family detection and key mapping (spec section 6)
# ---------------------------------------------------------------------------

def detect_family(keys):
    """Returns (family, prefix) from the tensor names."""
    keys = set(keys)
    if "model.embeddings.weight" in keys or \
            "model.layers.0.attn.q_proj.weight" in keys:
        return "fla", "model."
    if "layers.0.0.q_proj.weight" in keys:
        return "seed", ""
    for prefix in ("decoder.", "model.", ""):
        if prefix + "layers.0.retention.q_proj.weight" in keys:
            return "torchscale", prefix
    raise ValueError("cannot detect the RetNet family from the tensor names")


class _Weights:
    """Dict wrapper that casts on access and tracks which keys were used."""

    def __init__(self, sd, dtype):
        self.sd, self.dtype, self.used = sd, dtype, set()

    def has(self, key):
        return key in self.sd

    def raw(self, key):
        self.used.add(key)
        return self.sd[key]

    def get(self, key, optional=False):
        if optional and key not in self.sd:
            return None
        if key not in self.sd:
            raise KeyError(f"missing tensor {key}")
        return self.raw(key).to(self.dtype)

    def linear(self, prefix, bias=None):
        """bias: True required, False absent, None optional."""
        w = self.get(prefix + ".weight")
        b = self.get(prefix + ".bias", optional=bias is not True)
        if bias is False and b is not None:
            raise ValueError(f"unexpected bias {prefix}.bias")
        return Linear(w, b)

    def unused(self):
        return sorted(set(self.sd) - self.used)


def _num_layers(keys, pattern_prefix):
    n = 0
    while any(k.startswith(f"{pattern_prefix}{n}.") for k in keys):
        n += 1
    return n


def _check_theta(buf, d_k, name):
    flat = buf.reshape(-1).to(torch.float32)
    if flat.numel() != d_k:
        raise ValueError(f"{name}: expected {d_k} entries, got {flat.numel()}")
    if not torch.equal(flat[0::2], flat[1::2]):
        raise ValueError(f"{name}: not an interleaved duplicate table")
    ref = interleaved_theta(d_k)
    if not torch.allclose(flat[0::2], ref, rtol=1e-5, atol=0):
        raise ValueError(f"{name}: unexpected rotary frequencies")
    return flat[0::2].clone()


def _load_fla(cfg, w, dtype):
    m = RetNetRef()
    m.family, m.dtype = "fla", dtype
    for key, ok in (("use_short_conv", False), ("feature_map", None),
                    ("attn", None)):
        if cfg.get(key, ok) != ok:
            raise ValueError(f"fla: unsupported {key}={cfg.get(key)!r}")
    if not cfg.get("use_output_gate", True):
        raise ValueError("fla: use_output_gate=false is unsupported")
    h = int(cfg["num_heads"])
    if cfg.get("num_kv_heads") not in (None, h):
        raise ValueError("fla: grouped kv heads are unsupported")
    eps = float(cfg.get("norm_eps", 1e-6))
    m.num_heads = h
    m.rotary, m.scale_on, m.alpha_mode, m.gate_act = \
        "half", "q", "raw", "swish"
    m.embed = w.get("model.embeddings.weight")
    d = m.embed.shape[1]
    if int(cfg.get("hidden_size", d)) != d:
        raise ValueError("fla: hidden_size does not match the embedding")
    inter = cfg.get("intermediate_size")
    if inter is None:
        inter = 256 * math.ceil(int(d * cfg.get("hidden_ratio", 2) * 2 / 3)
                                / 256)
    act = cfg.get("hidden_act", "swish")
    keys = w.sd.keys()
    n_layers = _num_layers(keys, "model.layers.")
    if n_layers != int(cfg.get("num_hidden_layers", n_layers)):
        raise ValueError("fla: num_hidden_layers does not match the weights")
    layouts = set()
    for i in range(n_layers):
        p = f"model.layers.{i}."
        L = Layer()
        L.attn_norm = Norm("rms", eps, w.get(p + "attn_norm.weight"))
        for name in "qkvgo":
            setattr(L, name, w.linear(p + f"attn.{name}_proj", bias=False))
        m.d_k = L.q.out_features // h
        m.d_v = L.v.out_features // h
        gn = p + "attn.g_norm_swish_gate.weight"
        if not w.has(gn):
            gn = p + "attn.g_norm.weight"
        L.group_norm = Norm("rms", eps, w.get(gn))
        L.log_decay = default_log_decay(h)
        L.theta = half_theta(m.d_k)
        L.ffn_norm = Norm("rms", eps, w.get(p + "mlp_norm.weight"))
        gate = w.get(p + "mlp.gate_proj.weight")
        down = Linear(w.get(p + "mlp.down_proj.weight"))
        if w.has(p + "mlp.up_proj.weight"):
            up = w.get(p + "mlp.up_proj.weight")
            layouts.add("split")
        else:  # legacy fused: rows [0, I) gate (activated), [I, 2I) up
            if gate.shape[0] != 2 * inter:
                raise ValueError(f"fla: fused gate_proj has {gate.shape[0]} "
                                 f"rows, expected 2*{inter}")
            gate, up = gate[:inter], gate[inter:]
            layouts.add("fused")
        if gate.shape[0] != inter:
            raise ValueError(f"fla: gate_proj has {gate.shape[0]} rows, "
                             f"expected intermediate size {inter}")
        L.ffn = GatedFFN(Linear(gate), Linear(up), down, act)
        m.layers.append(L)
    m.layout = "/".join(sorted(layouts))
    m.final_norm = Norm("rms", eps, w.get("model.norm.weight"))
    tied = bool(cfg.get("tie_word_embeddings", False))
    if w.has("lm_head.weight"):
        if tied:
            raise ValueError("fla: tie_word_embeddings but lm_head present")
        m.head = w.linear("lm_head", bias=False)
    elif not tied:
        raise ValueError("fla: lm_head.weight missing and not tied")
    return m


def _load_torchscale(cfg, w, prefix, dtype):
    m = RetNetRef()
    m.family, m.dtype = "torchscale", dtype
    keys = list(w.sd.keys())
    for k in keys:
        if ".moe_layer." in k or ".A." in k or ".B." in k:
            raise ValueError(f"torchscale: unsupported variant (key {k})")
    if cfg.get("multiway"):
        raise ValueError("torchscale: multiway is unsupported")
    v1 = w.has(prefix + "layers.0.retention.q_proj.bias")
    m.layout = "v1" if v1 else "head"
    eps = float(cfg.get("layernorm_eps", 1e-5 if v1 else 1e-6))
    norm_kind = "ln" if v1 else "rms"

    def norm(name, required=True):
        if not required and not w.has(prefix + name + ".weight"):
            return None
        return Norm(norm_kind, eps, w.get(prefix + name + ".weight"),
                    w.get(prefix + name + ".bias", optional=not v1))

    log_decay = w.raw(prefix + "retnet_rel_pos.decay").to(torch.float32)
    h = log_decay.numel()
    if int(cfg.get("decoder_retention_heads", h)) != h:
        raise ValueError("torchscale: decoder_retention_heads disagrees with "
                         "the decay buffer")
    m.num_heads = h
    m.rotary, m.scale_on, m.alpha_mode, m.gate_act = \
        "interleaved", "k", "sqrt_c", "swish"
    m.normalize_before = bool(cfg.get("decoder_normalize_before", True))
    n_layers = _num_layers(keys, prefix + "layers.")
    if n_layers != int(cfg.get("decoder_layers", n_layers)):
        raise ValueError("torchscale: decoder_layers disagrees with weights")
    if cfg.get("deepnorm"):
        m.residual_alpha = (2.0 * n_layers) ** 0.25
    m.embed = w.get(prefix + "embed_tokens.weight")
    d = m.embed.shape[1]
    if int(cfg.get("decoder_embed_dim", d)) != d:
        raise ValueError("torchscale: decoder_embed_dim disagrees")
    m.embed_scale = 1.0 if cfg.get("no_scale_embedding", True) \
        else math.sqrt(d)
    m.embed_norm = norm("layernorm_embedding", required=False)
    if bool(cfg.get("layernorm_embedding", m.embed_norm is not None)) != \
            (m.embed_norm is not None):
        raise ValueError("torchscale: layernorm_embedding flag disagrees "
                         "with the weights")
    act = cfg.get("activation_fn", "gelu")
    theta = _check_theta(w.raw(prefix + "retnet_rel_pos.angle"),
                         d // h, "retnet_rel_pos.angle")
    for i in range(n_layers):
        p = f"{prefix}layers.{i}."
        L = Layer()
        L.attn_norm = norm(f"layers.{i}.retention_layer_norm")
        for name, key in zip("qkvgo", ("q_proj", "k_proj", "v_proj",
                                       "g_proj", "out_proj")):
            setattr(L, name, w.linear(p + "retention." + key, bias=v1))
        m.d_k = L.q.out_features // h
        m.d_v = L.v.out_features // h
        if v1:
            L.group_norm = Norm("ln", 1e-6)  # hard-coded upstream (e.g. 0b1f113)
        else:
            L.group_norm = Norm("rms", eps)
        L.log_decay = log_decay
        L.theta = theta
        L.ffn_norm = norm(f"layers.{i}.final_layer_norm")
        fc1 = w.linear(p + "ffn.fc1", bias=None)
        fc2 = w.linear(p + "ffn.fc2", bias=None)
        if w.has(p + "ffn.gate.weight"):
            L.ffn = GatedFFN(fc1, w.linear(p + "ffn.gate", bias=None), fc2,
                             act)
        else:
            inner = norm(f"layers.{i}.ffn.ffn_layernorm", required=False)
            L.ffn = PlainFFN(fc1, fc2, act, inner)
        m.layers.append(L)
    m.final_norm = norm("layer_norm", required=m.normalize_before)
    for head in ("output_projection.weight", "lm_head.weight"):
        if w.has(head) or w.has(prefix + head):
            key = head if w.has(head) else prefix + head
            m.head = Linear(w.get(key))
    tied = cfg.get("share_decoder_input_output_embed",
                   cfg.get("tie_word_embeddings", m.head is None))
    if bool(tied) != (m.head is None):
        raise ValueError("torchscale: tied-head flag disagrees with weights")
    return m


def _load_seed(cfg, w, dtype):
    m = RetNetRef()
    m.family, m.layout, m.dtype = "seed", "seed", dtype
    keys = list(w.sd.keys())
    n_layers = _num_layers(keys, "layers.")
    if n_layers != int(cfg.get("num_layer", n_layers)):
        raise ValueError("seed: num_layer disagrees with the weights")
    m.rotary, m.scale_on, m.alpha_mode = "interleaved", "k", "raw"
    m.gate_act = cfg.get("msr_gate_fn", "gelu")
    mlp_act = cfg.get("mlp_gate_fn", "gelu")
    for i in range(n_layers):
        p = f"layers.{i}."
        L = Layer()
        L.log_decay = w.raw(p + "0.decay").to(torch.float32)
        h = L.log_decay.numel()
        if int(cfg.get("num_heads", h)) != h:
            raise ValueError("seed: num_heads disagrees with the decay buffer")
        m.num_heads = h
        L.attn_norm = Norm("ln", 1e-5, w.get(p + "0.pre_norm.weight"),
                           w.get(p + "0.pre_norm.bias"))
        for name in "qkvgo":
            setattr(L, name, w.linear(p + f"0.{name}_proj", bias=True))
        m.d_k = L.q.out_features // h
        m.d_v = L.v.out_features // h
        L.theta = _check_theta(w.raw(p + "0.angle"), m.d_k, p + "0.angle")
        L.group_norm = Norm("ln", 1e-5, w.get(p + "0.norm.weight"),
                            w.get(p + "0.norm.bias"))
        L.ffn_norm = Norm("ln", 1e-5, w.get(p + "1.net.0.weight"),
                          w.get(p + "1.net.0.bias"))
        linears = []
        j = 1
        while w.has(f"{p}1.net.{j}.1.weight"):
            linears.append(w.linear(f"{p}1.net.{j}.1", bias=None))
            j += 1
        if not linears:
            raise ValueError(f"seed: layer {i} has no MLP Linear")
        L.ffn = SeedMLP(linears, mlp_act)
        m.layers.append(L)
    return m


def build_model(config, state_dict, dtype=torch.float64):
    """Reference model from a config dict and a tensor dict (unused tensors
    other than known buffers raise an error)."""
    family, prefix = detect_family(state_dict.keys())
    declared = config.get("family")
    if declared is None and config.get("model_type") == "retnet":
        declared = "fla"
    if declared not in (None, family):
        raise ValueError(f"config family {declared!r} but tensors look like "
                         f"{family!r}")
    w = _Weights(state_dict, dtype)
    if family == "fla":
        m = _load_fla(config, w, dtype)
    elif family == "torchscale":
        m = _load_torchscale(config, w, prefix, dtype)
    else:
        m = _load_seed(config, w, dtype)
    leftover = [k for k in w.unused() if not k.endswith(".version")]
    if leftover:
        raise ValueError(f"unused tensors: {leftover[:8]}")
    return m


def load_model(ckpt_dir, dtype=torch.float64):
    """Load ``ckpt_dir/config.json`` + ``ckpt_dir/model.safetensors``."""
    with open(os.path.join(ckpt_dir, "config.json")) as f:
        config = json.load(f)
    sd = load_file(os.path.join(ckpt_dir, "model.safetensors"))
    return build_model(config, sd, dtype)


# ---------------------------------------------------------------------------
# Self-test
# ---------------------------------------------------------------------------

def _rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _sensitivity(model, inputs, base):
    """Relative output change when one convention is flipped: guards that
    the goldens can tell the conventions apart."""
    def variant(fn):
        m = copy.deepcopy(model)
        fn(m)
        return _rel_err(m.forward(inputs), base)

    def flip_rotary(m):
        m.rotary = "half" if m.rotary == "interleaved" else "interleaved"

    def flip_alpha(m):
        m.alpha_mode = "raw" if m.alpha_mode == "sqrt_c" else "sqrt_c"

    def gn_eps(m):
        for L in m.layers:
            L.group_norm.eps *= 10

    def reverse_decay(m):
        for L in m.layers:
            L.log_decay = L.log_decay.flip(0)

    def flip_theta(m):  # same pairing, the other family's frequencies
        for L in m.layers:
            d_k = L.theta.numel() * 2
            L.theta = (half_theta(d_k) if m.rotary == "interleaved"
                       else interleaved_theta(d_k))

    def flip_gate(m):
        m.gate_act = "gelu" if m.gate_act in ("swish", "silu") else "swish"

    def no_retention(m):
        for L in m.layers:
            L.v = Linear(L.v.weight * 0, None)

    return {"rotary": variant(flip_rotary), "alpha": variant(flip_alpha),
            "gn_eps*10": variant(gn_eps),
            "decay_reversed": variant(reverse_decay),
            "theta": variant(flip_theta), "gate_act": variant(flip_gate),
            "no_retention": variant(no_retention)}


def self_test(seed=0, verbose=True):
    """For every golden case: parallel == recurrent == chunkwise (several
    chunk sizes) in float64, float32 close to float64, round trip through the
    checkpoint files, and the goldens are sensitive to each convention."""
    import tempfile
    import golden_cases

    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        for name in golden_cases.CASE_NAMES:
            case = golden_cases.build_case(name, seed)
            case_dir = os.path.join(tmp, name)
            golden_cases.write_checkpoint(case, case_dir)
            m64 = load_model(case_dir, torch.float64)
            m32 = load_model(case_dir, torch.float32)
            x = case.inputs[case.input_name]
            stats = []
            par = m64.forward(x, "parallel", stats=stats)
            errs = {"recurrent": _rel_err(m64.forward(x, "recurrent"), par)}
            for c in (1, 7, 16, 64):
                errs[f"chunk{c}"] = _rel_err(
                    m64.forward(x, "chunkwise", chunk_size=c), par)
            err32 = _rel_err(m32.forward(x.to(torch.float32)
                                         if x.is_floating_point() else x),
                             par)
            sens = _sensitivity(m64, x, par)
            worst = max(errs.values())
            bad = worst > 1e-10 or err32 > 1e-5
            # Every convention must move the output by >= 10x the default
            # golden tolerance (1e-4).
            weak = {k: v for k, v in sens.items() if v < 1e-3}
            ok &= not bad and not weak
            if verbose:
                print(f"{name:16s} {m64.family}/{m64.layout:6s} "
                      f"forms-vs-parallel {worst:.1e}  fp32 {err32:.1e}  "
                      f"mean(o^2) {min(stats):.1e}..{max(stats):.1e}  "
                      f"{'FAIL' if bad else 'ok'}")
                print("    sensitivity: " + "  ".join(
                    f"{k} {v:.1e}" for k, v in sens.items())
                    + (f"  WEAK {sorted(weak)}" if weak else ""))
    print("retnet_ref self-test:", "OK" if ok else "FAILED")
    return ok


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--self-test", action="store_true",
                    help="check the forms agree for every golden case")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.self_test:
        return 0 if self_test(args.seed) else 1
    ap.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
