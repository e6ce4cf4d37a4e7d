"""Random small RetNet checkpoints for the golden tests, one per layout.

Each builder returns a ``Case`` with the upstream config.json contents, a
state dict of float32 tensors under the real upstream key names (spec
sections 2.3, 3.6, 4.4, 5) and the forward inputs.  Everything is
deterministic given (case name, seed).

Weight scales: Linear weights ~ N(0, (gain / sqrt(fan_in))^2) so that
activations stay O(1); norm weights 1 + N(0, 0.1^2); biases N(0, 0.05^2).
The value projections are then rescaled layer by layer ("calibrated") so
that the raw retention output fed to the per-head group norm has
mean(o^2) = CALIB_RATIO * group_norm_eps.  In that regime the group norm's
eps is not negligible, so the goldens can tell apart the row normalisation
(alpha = 1 vs 1/sqrt(c_n)), the group-norm eps and the decay per head, which
a model with large o would hide (spec 1.3).
"""

import json
import math
import os
import zlib
from dataclasses import dataclass, field

import torch

import retnet_ref
from safetensors_io import save_file

CALIB_RATIO = 20.0

# Order matters only for cases.txt.
CASE_NAMES = ["fla", "fla_legacy", "fla_long", "torchscale", "torchscale_v1",
              "syncdoth", "syncdoth_lmdecay", "seed", "seed_list"]


@dataclass
class Case:
    name: str
    config: dict
    state_dict: dict                 # name -> float32 tensor
    inputs: dict                     # "tokens" int64 [B,T] / "features"
    input_name: str
    notes: list = field(default_factory=list)


class _Init:
    """Deterministic random tensors (float64 draws, stored as float32)."""

    def __init__(self, name, seed):
        self.g = torch.Generator().manual_seed(
            seed * 1_000_003 + zlib.crc32(name.encode()))

    def normal(self, shape, std):
        return (torch.randn(shape, generator=self.g, dtype=torch.float64)
                * std).to(torch.float32)

    def linear(self, out_f, in_f, gain=1.0):
        return self.normal((out_f, in_f), gain / math.sqrt(in_f))

    def norm_weight(self, n):
        return (1.0 + self.normal((n,), 0.1)).to(torch.float32)

    def bias(self, n):
        return self.normal((n,), 0.05)

    def tokens(self, b, t, vocab):
        return torch.randint(0, vocab, (b, t), generator=self.g)

    def features(self, b, t, d):
        return self.normal((b, t, d), 1.0)


# ---------------------------------------------------------------------------
# fla (HF, model_type "retnet")
# ---------------------------------------------------------------------------

def _fla_case(name, seed, d, h, n_layers, vocab, b, t, expand_k=1.0,
              expand_v=2.0, intermediate_size=None, norm_eps=1e-6,
              legacy=False):
    init = _Init(name, seed)
    hidden_ratio = 2
    inter = intermediate_size or 256 * math.ceil(
        int(d * hidden_ratio * 2 / 3) / 256)
    key_dim, value_dim = int(d * expand_k), int(d * expand_v)
    d_v = value_dim // h
    cfg = {
        "architectures": ["RetNetForCausalLM"],
        "model_type": "retnet",
        "attn_mode": "chunk",
        "hidden_size": d,
        "expand_k": expand_k,
        "expand_v": expand_v,
        "hidden_ratio": hidden_ratio,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": n_layers,
        "num_heads": h,
        "num_kv_heads": None,
        "feature_map": None,
        "hidden_act": "swish",
        "use_short_conv": False,
        "conv_size": 4,
        "use_output_gate": True,
        "max_position_embeddings": 2048,
        "elementwise_affine": True,
        "norm_eps": norm_eps,
        "attn": None,
        "use_cache": True,
        "pad_token_id": None,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": legacy,
        "initializer_range": 0.006,
        "fuse_norm": True,
        "fuse_swiglu": True,
        "fuse_cross_entropy": True,
        "vocab_size": vocab,
        "torch_dtype": "float32",
    }
    if legacy:
        cfg["rms_norm_eps"] = norm_eps  # legacy duplicate seen on the hub
    # Untied: O(1) embeddings.  Tied: std D^-1/2 so logits stay O(1).
    sd = {"model.embeddings.weight":
          init.normal((vocab, d), d ** -0.5 if legacy else 1.0)}
    for i in range(n_layers):
        p = f"model.layers.{i}."
        sd[p + "attn_norm.weight"] = init.norm_weight(d)
        sd[p + "attn.q_proj.weight"] = init.linear(key_dim, d)
        sd[p + "attn.k_proj.weight"] = init.linear(key_dim, d)
        sd[p + "attn.v_proj.weight"] = init.linear(value_dim, d)
        sd[p + "attn.g_proj.weight"] = init.linear(value_dim, d)
        sd[p + "attn.o_proj.weight"] = init.linear(d, value_dim)
        gn = "attn.g_norm.weight" if legacy else \
            "attn.g_norm_swish_gate.weight"
        sd[p + gn] = init.norm_weight(d_v)
        sd[p + "mlp_norm.weight"] = init.norm_weight(d)
        gate = init.linear(inter, d)
        up = init.linear(inter, d)
        if legacy:  # fused: rows [0, I) activated branch, [I, 2I) linear
            sd[p + "mlp.gate_proj.weight"] = torch.cat([gate, up], 0)
        else:
            sd[p + "mlp.gate_proj.weight"] = gate
            sd[p + "mlp.up_proj.weight"] = up
        sd[p + "mlp.down_proj.weight"] = init.linear(d, inter)
    sd["model.norm.weight"] = init.norm_weight(d)
    if not legacy:
        sd["lm_head.weight"] = init.linear(vocab, d)
    inputs = {"tokens": init.tokens(b, t, vocab)}
    return Case(name, cfg, sd, inputs, "tokens")


# ---------------------------------------------------------------------------
# torchscale (HEAD and v1) and syncdoth
# ---------------------------------------------------------------------------

def torchscale_config(d, d_v, h, f, n_layers, vocab, activation_fn,
                      no_scale_embedding, layernorm_embedding, layernorm_eps,
                      share_embed, subln=True):
    """config.json for the torchscale family (RetNetConfig field names)."""
    return {
        "family": "torchscale",
        "decoder_embed_dim": d,
        "decoder_value_embed_dim": d_v,
        "decoder_retention_heads": h,
        "decoder_ffn_embed_dim": f,
        "decoder_layers": n_layers,
        "decoder_normalize_before": True,
        "activation_fn": activation_fn,
        "no_scale_embedding": no_scale_embedding,
        "layernorm_embedding": layernorm_embedding,
        "layernorm_eps": layernorm_eps,
        "share_decoder_input_output_embed": share_embed,
        "deepnorm": False,
        "subln": subln,
        "multiway": False,
        "chunkwise_recurrent": False,
        "recurrent_chunk_size": 512,
        "vocab_size": vocab,
    }


def _torchscale_weights(init, prefix, d, d_v, h, f, n_layers, vocab, v1,
                        layernorm_embedding, head_key, log_decay=None):
    """State dict of a torchscale RetNetDecoder (HEAD or v1 layout)."""
    sd = {}

    def norm(name, n):
        sd[prefix + name + ".weight"] = init.norm_weight(n)
        if v1:
            sd[prefix + name + ".bias"] = init.bias(n)

    def lin(name, out_f, in_f, bias):
        sd[prefix + name + ".weight"] = init.linear(out_f, in_f)
        if bias:
            sd[prefix + name + ".bias"] = init.bias(out_f)

    # fairseq Embedding init N(0, D^-1/2); times sqrt(D) -> O(1).
    sd[prefix + "embed_tokens.weight"] = init.normal((vocab, d),
                                                     d ** -0.5)
    if layernorm_embedding:
        norm("layernorm_embedding", d)
    for i in range(n_layers):
        p = f"layers.{i}."
        for name in ("q_proj", "k_proj"):
            lin(p + "retention." + name, d, d, v1)
        for name in ("v_proj", "g_proj"):
            lin(p + "retention." + name, d_v, d, v1)
        lin(p + "retention.out_proj", d, d_v, v1)
        norm(p + "retention_layer_norm", d)
        if v1:
            lin(p + "ffn.fc1", f, d, True)
            norm(p + "ffn.ffn_layernorm", f)
            lin(p + "ffn.fc2", d, f, True)
        else:
            lin(p + "ffn.fc1", f, d, False)
            lin(p + "ffn.gate", f, d, False)
            lin(p + "ffn.fc2", d, f, False)
        norm(p + "final_layer_norm", d)
    norm("layer_norm", d)
    if log_decay is None:
        log_decay = retnet_ref.default_log_decay(h)
    sd[prefix + "retnet_rel_pos.angle"] = \
        retnet_ref.interleaved_angle_buffer(d // h)
    sd[prefix + "retnet_rel_pos.decay"] = log_decay
    if head_key is not None:
        sd[head_key] = init.linear(vocab, d)
    return sd


def _torchscale_case(name, seed):
    init = _Init(name, seed)
    d, d_v, h, f, n_layers, vocab = 64, 108, 2, 96, 2, 250
    cfg = torchscale_config(d, d_v, h, f, n_layers, vocab, "swish",
                            no_scale_embedding=False,
                            layernorm_embedding=True, layernorm_eps=1e-6,
                            share_embed=False)
    sd = _torchscale_weights(init, "decoder.", d, d_v, h, f, n_layers, vocab,
                             v1=False, layernorm_embedding=True,
                             head_key="decoder.output_projection.weight")
    return Case(name, cfg, sd, {"tokens": init.tokens(2, 37, vocab)},
                "tokens")


def _torchscale_v1_case(name, seed):
    init = _Init(name, seed)
    d, h, n_layers, vocab = 64, 4, 2, 260
    d_v, f = 2 * d, 2 * d
    cfg = torchscale_config(d, d_v, h, f, n_layers, vocab, "gelu",
                            no_scale_embedding=True,
                            layernorm_embedding=False, layernorm_eps=1e-5,
                            share_embed=True)
    sd = _torchscale_weights(init, "", d, d_v, h, f, n_layers, vocab,
                             v1=True, layernorm_embedding=False,
                             head_key=None)
    return Case(name, cfg, sd, {"tokens": init.tokens(2, 37, vocab)},
                "tokens")


def _syncdoth_case(name, seed, lm_decay=False):
    init = _Init(name, seed)
    d, d_v, h, f, vocab = 48, 96, 3, 80, 200
    n_layers = 1 if lm_decay else 2
    cfg = {
        "architectures": ["RetNetForCausalLM"],
        "model_type": "retnet",
        "family": "torchscale",
        "vocab_size": vocab,
        "pad_token_id": 0,
        "eos_token_id": 0,
        "initializer_range": 0.02,
        "is_decoder": True,
        "activation_fn": "swish",
        "dropout": 0.0,
        "activation_dropout": 0.0,
        "drop_path_rate": 0.0,
        "decoder_embed_dim": d,
        "decoder_value_embed_dim": d_v,
        "decoder_ffn_embed_dim": f,
        "decoder_layers": n_layers,
        "decoder_retention_heads": h,
        "decoder_normalize_before": True,
        "layernorm_embedding": True,
        "no_scale_embedding": False,
        "recurrent_chunk_size": 512,
        "use_glu": True,
        "z_loss_coeff": 0.0,
        "use_lm_decay": lm_decay,
        "deepnorm": False,
        "subln": True,
        "use_ffn_rms_norm": False,
        "layernorm_eps": 1e-6,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }
    log_decay = retnet_ref.lm_log_decay(h) if lm_decay else None
    sd = _torchscale_weights(init, "model.", d, d_v, h, f, n_layers, vocab,
                             v1=False, layernorm_embedding=True,
                             head_key="lm_head.weight", log_decay=log_decay)
    return Case(name, cfg, sd, {"tokens": init.tokens(2, 37, vocab)},
                "tokens")


# ---------------------------------------------------------------------------
# seed (myscience/retnet-pytorch)
# ---------------------------------------------------------------------------

def seed_weights(init, num_layer, num_heads, dim_model, value_factor,
                 mlp_mult, mlp_bias=True):
    """State dict of seed RetNet(...) with the given constructor args."""
    d, h = dim_model, num_heads
    d_k, dv_total = d // h, d * value_factor
    hidden = list(mlp_mult) if isinstance(mlp_mult, (list, tuple)) \
        else [mlp_mult]
    dims = [d] + hidden + [d]
    sd = {}
    for i in range(num_layer):
        p = f"layers.{i}."
        sd[p + "0.angle"] = retnet_ref.interleaved_angle_buffer(d_k)[None]
        sd[p + "0.decay"] = retnet_ref.default_log_decay(h)
        for name, out_f, in_f in (("q_proj", d, d), ("k_proj", d, d),
                                  ("v_proj", dv_total, d),
                                  ("g_proj", dv_total, d),
                                  ("o_proj", d, dv_total)):
            sd[p + f"0.{name}.weight"] = init.linear(out_f, in_f)
            sd[p + f"0.{name}.bias"] = init.bias(out_f)
        sd[p + "0.pre_norm.weight"] = init.norm_weight(d)
        sd[p + "0.pre_norm.bias"] = init.bias(d)
        sd[p + "0.norm.weight"] = init.norm_weight(dv_total // h)
        sd[p + "0.norm.bias"] = init.bias(dv_total // h)
        sd[p + "1.net.0.weight"] = init.norm_weight(d)
        sd[p + "1.net.0.bias"] = init.bias(d)
        for j, (a, b) in enumerate(zip(dims[:-1], dims[1:]), start=1):
            sd[p + f"1.net.{j}.1.weight"] = init.linear(b, a)
            if mlp_bias:
                sd[p + f"1.net.{j}.1.bias"] = init.bias(b)
    return sd


def _seed_case(name, seed, num_layer, num_heads, dim_model, msr_gate_fn,
               mlp_mult):
    init = _Init(name, seed)
    cfg = {"family": "seed", "num_layer": num_layer, "num_heads": num_heads,
           "dim_model": dim_model, "value_factor": 2,
           "msr_gate_fn": msr_gate_fn, "mlp_gate_fn": "gelu",
           "mlp_mult": mlp_mult, "mlp_bias": True}
    sd = seed_weights(init, num_layer, num_heads, dim_model, 2, mlp_mult)
    feats = init.features(2, 37, dim_model)
    return Case(name, cfg, sd, {"features": feats}, "features")


# ---------------------------------------------------------------------------
# Registry, calibration, writing
# ---------------------------------------------------------------------------

_BUILDERS = {
    "fla": lambda n, s: _fla_case(n, s, d=64, h=4, n_layers=2, vocab=300,
                                  b=2, t=37),
    "fla_legacy": lambda n, s: _fla_case(n, s, d=48, h=2, n_layers=2,
                                         vocab=256, b=2, t=37,
                                         intermediate_size=96,
                                         norm_eps=1e-5, legacy=True),
    "fla_long": lambda n, s: _fla_case(n, s, d=32, h=2, n_layers=1,
                                       vocab=64, b=1, t=300),
    "torchscale": _torchscale_case,
    "torchscale_v1": _torchscale_v1_case,
    "syncdoth": _syncdoth_case,
    "syncdoth_lmdecay": lambda n, s: _syncdoth_case(n, s, lm_decay=True),
    "seed": lambda n, s: _seed_case(n, s, 2, 4, 64, "gelu", 4),
    "seed_list": lambda n, s: _seed_case(n, s, 2, 2, 32, "silu", [96, 48]),
}
assert list(_BUILDERS) == CASE_NAMES


def _v_proj_keys(model_family, state_dict, layer):
    for w in (f"model.layers.{layer}.attn.v_proj",
              f"decoder.layers.{layer}.retention.v_proj",
              f"model.layers.{layer}.retention.v_proj",
              f"layers.{layer}.retention.v_proj",
              f"layers.{layer}.0.v_proj"):
        if w + ".weight" in state_dict:
            return [k for k in (w + ".weight", w + ".bias")
                    if k in state_dict]
    raise KeyError(f"no v_proj for layer {layer} ({model_family})")


def calibrate(case, ratio=CALIB_RATIO):
    """Rescale v_proj per layer so that mean(o^2) before the group norm is
    ratio * group-norm eps (layer i only depends on layers < i)."""
    sd = case.state_dict
    x = case.inputs[case.input_name]
    model = retnet_ref.build_model(case.config, sd)
    for i in range(len(model.layers)):
        stats = []
        model.forward(x, "parallel", stats=stats)
        eps = model.layers[i].group_norm.eps
        factor = math.sqrt(ratio * eps / stats[i])
        for k in _v_proj_keys(model.family, sd, i):
            sd[k] = (sd[k].double() * factor).to(torch.float32)
        model = retnet_ref.build_model(case.config, sd)
    return case


def build_case(name, seed=0):
    """Deterministic calibrated Case for ``name``."""
    if name not in _BUILDERS:
        raise KeyError(f"unknown case {name!r}; known: {CASE_NAMES}")
    return calibrate(_BUILDERS[name](name, seed))


def write_checkpoint(case, case_dir):
    """config.json, model.safetensors and input.safetensors."""
    os.makedirs(case_dir, exist_ok=True)
    with open(os.path.join(case_dir, "config.json"), "w") as f:
        json.dump(case.config, f, indent=2)
        f.write("\n")
    save_file(case.state_dict, os.path.join(case_dir, "model.safetensors"),
              metadata={"format": "pt"})
    save_file(case.inputs, os.path.join(case_dir, "input.safetensors"))
