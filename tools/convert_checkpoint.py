#!/usr/bin/python3
"""Convert PyTorch RetNet checkpoints (.pt) to the retnet-serve directory
format: OUT_DIR/config.json + OUT_DIR/model.safetensors.

    # torchscale / fairseq checkpoint: {"model": state_dict, "cfg": ...}
    # (cfg["model"] may be a dict, an argparse.Namespace or an omegaconf
    # DictConfig; old checkpoints carry "args" instead of "cfg")
    convert_checkpoint.py checkpoint_best.pt OUT_DIR [--config OVERRIDES]

    # plain torchscale / syncdoth / fla state_dict: the config is required
    convert_checkpoint.py state_dict.pt OUT_DIR --config config.json

    # seed (myscience/retnet-pytorch) state_dict plus its constructor args
    convert_checkpoint.py retnet.pt OUT_DIR --seed-args '{"num_heads": 8}'
    convert_checkpoint.py retnet.pt OUT_DIR --msr-gate-fn gelu --mlp-mult 4

    # tokenizer from another directory; fairseq GPT-2 BPE dictionary
    convert_checkpoint.py model.pt OUT_DIR --config c.json --tokenizer-dir HF
    convert_checkpoint.py checkpoint_best.pt OUT_DIR --fairseq-dict dict.txt \
        --gpt2-encoder encoder.json --gpt2-bpe vocab.bpe

--config and --seed-args take a JSON file path or an inline JSON object.
Tensor names are kept exactly (so the loader's family detection applies);
non-tensor entries and fairseq bookkeeping (``*.version``) are dropped, and
a tied output projection (share_decoder_input_output_embed) is not written.
config.json gets ``"family"`` ("torchscale", "seed" or "fla") and, for the
torchscale family, the RetNetConfig field names with every size taken from
the tensor shapes.  Settings that are not visible in the weights
(activation_fn, no_scale_embedding, layernorm_eps, gate functions) come
from the checkpoint's cfg/args or the overrides; where neither has them the
documented upstream defaults are used with a warning.  The result is loaded
back with the Python reference (retnet_ref.py) and run on a few tokens
unless --no-verify is given.

Tokenizer: the tokenizer files of the checkpoint's directory (or of
--tokenizer-dir) are copied to OUT_DIR: tokenizer.json,
tokenizer_config.json, special_tokens_map.json, generation_config.json,
vocab.json, merges.txt, tokenizer.model (regular files only; a symlink only
where it stays inside that directory; each file carried or skipped is
reported).  A fairseq GPT-2 BPE model (dict.txt over GPT-2's encoder.json
and vocab.bpe, given with --fairseq-dict/--gpt2-encoder/--gpt2-bpe or all
three found in that directory) becomes vocab.json (token -> fairseq index),
merges.txt and tokenizer_config.json (bos <s>, eos </s>, add_bos_token
false); see convert_tokenizer.py.  --no-tokenizer carries nothing.

Exit status 0 on success; 1 with one line on stderr on failure.
"""

import argparse
import json
import os
import pickle
import sys
from collections.abc import Mapping

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import retnet_ref  # noqa: E402
from safetensors_io import save_file  # noqa: E402
import convert_tokenizer  # noqa: E402
from convert_tokenizer import TokenizerError  # noqa: E402


class ConvertError(Exception):
    pass


def warn(msg):
    print(f"convert_checkpoint: warning: {msg}", file=sys.stderr)


# ---------------------------------------------------------------------------
# Tolerant loading: fairseq checkpoints pickle omegaconf / fairseq objects.
# Classes that cannot be imported here become generic stubs that keep their
# constructor args and pickled state, from which plain values are recovered.
# ---------------------------------------------------------------------------

class _Stub:
    _stub_name = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj._stub_args = args
        obj._stub_state = None
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self._stub_state = state

    def __call__(self, *args, **kwargs):  # used as a factory function
        return type(self)(*args, **kwargs)


def _make_stub(module, name):
    return type(name, (_Stub,), {"_stub_name": f"{module}.{name}",
                                 "__module__": "_stub." + module})


class _TolerantUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            return _make_stub(module, name)


def torch_load(path):
    """torch.load on CPU that survives missing omegaconf/fairseq modules.

    torch.load builds its unpickler by subclassing ``pickle.Unpickler`` (and
    torch 1.13 ignores a custom pickle_module unless weights_only is set), so
    the tolerant class is swapped in for the duration of the call."""
    original = pickle.Unpickler
    pickle.Unpickler = _TolerantUnpickler
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except TypeError:  # torch without the weights_only argument
            return torch.load(path, map_location="cpu")
    finally:
        pickle.Unpickler = original


def to_plain(obj, depth=0):
    """Namespaces, mappings, omegaconf DictConfig (real or stubbed) and
    nodes -> plain dicts / lists / scalars."""
    if depth > 50:
        raise ConvertError("config nesting too deep")
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (list, tuple)):
        return [to_plain(x, depth + 1) for x in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist() if obj.numel() <= 16 else None
    if isinstance(obj, argparse.Namespace):
        return {k: to_plain(v, depth + 1) for k, v in vars(obj).items()}
    if isinstance(obj, _Stub):
        # copyreg._reconstructor bypasses __new__: attributes may be absent.
        state = getattr(obj, "_stub_state", None)
        stub_args = getattr(obj, "_stub_args", ())
        if isinstance(state, tuple) and len(state) == 2 and \
                isinstance(state[1], dict):  # (dict state, slot state)
            state = {**(state[0] or {}), **state[1]}
        if isinstance(state, dict):
            if "_content" in state:      # omegaconf container
                return to_plain(state["_content"], depth + 1)
            if "_val" in state:          # omegaconf value node
                return to_plain(state["_val"], depth + 1)
            return {k: to_plain(v, depth + 1) for k, v in state.items()
                    if not k.startswith("_")}
        if stub_args:                   # e.g. an Enum member
            return to_plain(stub_args[0], depth + 1)
        return None
    if isinstance(obj, Mapping) or (hasattr(obj, "keys") and
                                    hasattr(obj, "__getitem__")):
        try:
            return {str(k): to_plain(obj[k], depth + 1) for k in obj.keys()}
        except Exception:  # noqa: BLE001 - e.g. omegaconf missing values
            return {str(k): None for k in obj.keys()}
    if hasattr(obj, "__dict__"):
        return {k: to_plain(v, depth + 1) for k, v in vars(obj).items()
                if not k.startswith("_")}
    return str(obj)


def read_json_arg(value, what):
    """A JSON file path or an inline JSON object -> dict."""
    if value is None:
        return {}
    try:
        if os.path.isfile(value):
            with open(value) as f:
                data = json.load(f)
        else:
            data = json.loads(value)
    except (OSError, json.JSONDecodeError) as e:
        raise ConvertError(f"{what}: not a JSON file or object: {e}") \
            from None
    if not isinstance(data, dict):
        raise ConvertError(f"{what}: expected a JSON object")
    return data


# ---------------------------------------------------------------------------
# Checkpoint anatomy
# ---------------------------------------------------------------------------

def split_checkpoint(obj):
    """Returns (state_dict, model_cfg dict or None) from a loaded .pt."""
    if isinstance(obj, torch.nn.Module):
        raise ConvertError("the file holds a pickled module; save its "
                           "state_dict() instead")
    if not isinstance(obj, Mapping):
        raise ConvertError(f"unsupported checkpoint object {type(obj)}")
    model_cfg = None
    if "model" in obj and isinstance(obj["model"], Mapping):
        sd = obj["model"]
        cfg = obj.get("cfg")
        if cfg is not None:
            cfg = to_plain(cfg)
            if isinstance(cfg, dict):
                model_cfg = cfg.get("model") if isinstance(
                    cfg.get("model"), dict) else None
        if model_cfg is None and obj.get("args") is not None:
            model_cfg = to_plain(obj["args"])
    elif "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        sd = obj["state_dict"]
    else:
        sd = obj
    tensors = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ConvertError("no tensors found in the checkpoint")
    dropped = sorted(set(sd) - set(tensors))
    if dropped:
        warn(f"dropping non-tensor entries {dropped[:5]}")
    # DistributedDataParallel wrapper prefix.
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return dict(tensors), model_cfg


def _drop_bookkeeping(sd):
    out = {}
    for k, v in sd.items():
        if k.endswith(".version") or k.endswith("._float_tensor"):
            continue
        out[k] = v
    return out


def _count_layers(keys, prefix):
    n = 0
    while any(k.startswith(f"{prefix}{n}.") for k in keys):
        n += 1
    return n


# ---------------------------------------------------------------------------
# torchscale / syncdoth
# ---------------------------------------------------------------------------

TORCHSCALE_FIELDS = [
    "decoder_embed_dim", "decoder_value_embed_dim", "decoder_retention_heads",
    "decoder_ffn_embed_dim", "decoder_layers", "decoder_normalize_before",
    "activation_fn", "no_scale_embedding", "layernorm_embedding",
    "layernorm_eps", "share_decoder_input_output_embed", "deepnorm", "subln",
    "multiway", "chunkwise_recurrent", "recurrent_chunk_size", "vocab_size"]


def convert_torchscale(sd, prefix, model_cfg, overrides):
    keys = list(sd)
    for k in keys:
        if ".moe_layer." in k or ".A." in k or ".B." in k:
            raise ConvertError(f"unsupported torchscale variant (key {k})")
    src = dict(model_cfg or {})
    if "tie_word_embeddings" in src and \
            "share_decoder_input_output_embed" not in src:
        src["share_decoder_input_output_embed"] = src["tie_word_embeddings"]
    src.update(overrides)
    if "tie_word_embeddings" in overrides:
        src["share_decoder_input_output_embed"] = \
            overrides["tie_word_embeddings"]
    if model_cfg is None and not overrides:
        raise ConvertError("plain torchscale state_dict: pass --config with "
                           "the RetNetConfig fields (activation_fn, "
                           "no_scale_embedding, layernorm_eps, ...)")
    fairseq = model_cfg is not None
    v1 = prefix + "layers.0.retention.q_proj.bias" in sd
    p = prefix

    def need(key):
        if key not in sd:
            raise ConvertError(f"missing tensor {key}")
        return sd[key]

    embed = need(p + "embed_tokens.weight")
    vocab, d = embed.shape
    decay = need(p + "retnet_rel_pos.decay")
    need(p + "retnet_rel_pos.angle")
    h = decay.numel()
    n_layers = _count_layers(keys, p + "layers.")
    d_v = need(p + "layers.0.retention.v_proj.weight").shape[0]
    f = need(p + "layers.0.ffn.fc1.weight").shape[0]
    derived = {
        "decoder_embed_dim": d, "decoder_value_embed_dim": d_v,
        "decoder_retention_heads": h, "decoder_ffn_embed_dim": f,
        "decoder_layers": n_layers, "vocab_size": vocab,
        "layernorm_embedding": p + "layernorm_embedding.weight" in sd,
        "decoder_normalize_before": p + "layer_norm.weight" in sd,
    }
    for k, v in derived.items():
        if k in src and src[k] is not None and src[k] != v and \
                not (k == "vocab_size" and src[k] in (-1, 0)):
            if k in overrides or not fairseq:
                raise ConvertError(f"config {k}={src[k]!r} but the weights "
                                   f"say {v!r}")
            warn(f"checkpoint cfg {k}={src[k]!r} ignored; the weights say "
                 f"{v!r}")
    # Output head: fairseq stores a tied projection under both names.
    head_key = None
    for cand in (p + "output_projection.weight", "lm_head.weight",
                 p + "lm_head.weight"):
        if cand in sd:
            head_key = cand
    share = src.get("share_decoder_input_output_embed")
    if head_key is None:
        if share is False:
            raise ConvertError("share_decoder_input_output_embed is false "
                               "but there is no output projection")
        share = True
    else:
        same = (sd[head_key].data_ptr() == embed.data_ptr()
                and sd[head_key].shape == embed.shape) or \
            (sd[head_key].shape == embed.shape
             and torch.equal(sd[head_key], embed))
        if share is None:
            share = same
        elif share and not same:
            raise ConvertError("share_decoder_input_output_embed is true but "
                               f"{head_key} differs from embed_tokens")
        if share:
            sd = {k: v for k, v in sd.items() if k != head_key}
    defaults = {
        "activation_fn": "gelu" if v1 else "swish",
        "no_scale_embedding": False,
        "layernorm_eps": 1e-5 if v1 else 1e-6,
    }
    cfg = {"family": "torchscale"}
    for k in TORCHSCALE_FIELDS:
        if k in derived:
            cfg[k] = derived[k]
        elif k == "share_decoder_input_output_embed":
            cfg[k] = bool(share)
        elif src.get(k) is not None:
            cfg[k] = src[k]
        elif k in defaults:
            warn(f"{k} not given; using the fairseq LM default "
                 f"{defaults[k]!r}")
            cfg[k] = defaults[k]
        else:
            cfg[k] = {"deepnorm": False, "multiway": False,
                      "subln": True, "chunkwise_recurrent": False,
                      "recurrent_chunk_size": 512}[k]
    if cfg["multiway"]:
        raise ConvertError("multiway checkpoints are unsupported")
    if cfg["activation_fn"] not in retnet_ref.ACTIVATIONS:
        raise ConvertError(f"unsupported activation_fn "
                           f"{cfg['activation_fn']!r}")
    return sd, cfg


# ---------------------------------------------------------------------------
# seed
# ---------------------------------------------------------------------------

SEED_FIELDS = ["num_layer", "num_heads", "dim_model", "value_factor",
               "msr_gate_fn", "mlp_gate_fn", "mlp_mult", "mlp_bias"]


def convert_seed(sd, seed_args):
    keys = list(sd)
    n_layers = _count_layers(keys, "layers.")
    d = sd["layers.0.0.q_proj.weight"].shape[1]
    h = sd["layers.0.0.decay"].numel()
    dv_total = sd["layers.0.0.v_proj.weight"].shape[0]
    if dv_total % d:
        raise ConvertError(f"v_proj width {dv_total} is not a multiple of "
                           f"dim_model {d}")
    widths = []
    j = 1
    while f"layers.0.1.net.{j}.1.weight" in sd:
        widths.append(sd[f"layers.0.1.net.{j}.1.weight"].shape[0])
        j += 1
    if not widths or widths[-1] != d:
        raise ConvertError("seed MLP weights not found or malformed")
    hidden = widths[:-1]
    derived = {
        "num_layer": n_layers, "num_heads": h, "dim_model": d,
        "value_factor": dv_total // d,
        "mlp_mult": hidden[0] if len(hidden) == 1 else hidden,
        "mlp_bias": "layers.0.1.net.1.1.bias" in sd,
    }
    cfg = {"family": "seed"}
    for k in SEED_FIELDS:
        given = seed_args.get(k)
        if k in derived:
            v = derived[k]
            if given is not None:
                norm_given = given
                if k == "mlp_mult" and isinstance(given, list) and \
                        len(given) == 1:
                    norm_given = given[0]
                if norm_given != v:
                    raise ConvertError(f"seed arg {k}={given!r} but the "
                                       f"weights say {v!r}")
            cfg[k] = v
        elif given is not None:
            cfg[k] = given
        else:
            warn(f"{k} not given; using the seed RetNet default 'gelu'")
            cfg[k] = "gelu"
        if k.endswith("_gate_fn") and cfg[k] not in retnet_ref.ACTIVATIONS:
            raise ConvertError(f"unsupported {k} {cfg[k]!r}")
    unknown = sorted(set(seed_args) - set(SEED_FIELDS) - {"dropout"})
    if unknown:
        warn(f"ignoring seed args {unknown}")
    return sd, cfg


# ---------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------

def _cast(sd, dtype):
    if dtype is None:
        return sd
    out = {}
    for k, v in sd.items():
        keep = k.endswith("retnet_rel_pos.decay") or \
            k.endswith("retnet_rel_pos.angle") or \
            k.endswith(".0.decay") or k.endswith(".0.angle")
        out[k] = v if keep or not v.is_floating_point() else v.to(dtype)
    return out


def verify(out_dir):
    """Load the result with the reference and run a few positions."""
    model = retnet_ref.load_model(out_dir, torch.float32)
    if model.takes_tokens:
        x = torch.arange(5).remainder(model.embed.shape[0])[None]
    else:
        d = model.layers[0].q.weight.shape[1]
        x = torch.linspace(-1, 1, 5 * d).view(1, 5, d)
    out = model.forward(x, "parallel")
    if not torch.isfinite(out).all():
        raise ConvertError("verification forward produced non-finite values")
    return model


def convert(src_path, out_dir, family="auto", config=None, seed_args=None,
            dtype=None, do_verify=True, tokenizer=True, tokenizer_dir=None,
            fairseq_dict=None, gpt2_encoder=None, gpt2_bpe=None,
            report=None):
    """Library entry point; returns (config dict, tensor dict).  REPORT (a
    list) receives the tokenizer's stdout lines and its warnings are
    printed with warn()."""
    plan = None
    if tokenizer:
        # Planned (and validated) before anything is written.
        plan = convert_tokenizer.plan_tokenizer(
            os.path.dirname(os.path.abspath(src_path)), tokenizer_dir,
            fairseq_dict, gpt2_encoder, gpt2_bpe)
    elif any(x is not None for x in (tokenizer_dir, fairseq_dict,
                                     gpt2_encoder, gpt2_bpe)):
        raise ConvertError("--no-tokenizer with tokenizer options")
    try:
        obj = torch_load(src_path)
    except (OSError, RuntimeError, pickle.UnpicklingError, EOFError) as e:
        raise ConvertError(f"cannot load {src_path}: {e}") from None
    sd, model_cfg = split_checkpoint(obj)
    sd = _drop_bookkeeping(sd)
    detected, prefix = retnet_ref.detect_family(sd.keys())
    if family != "auto" and family != detected:
        raise ConvertError(f"--family {family} but the tensors look like "
                           f"{detected}")
    if detected == "torchscale":
        sd, cfg = convert_torchscale(sd, prefix, model_cfg, config or {})
    elif detected == "seed":
        if config:
            raise ConvertError("seed checkpoints take --seed-args, not "
                               "--config")
        sd, cfg = convert_seed(sd, seed_args or {})
    else:  # fla: the HF config.json must be given
        if not config:
            raise ConvertError("fla state_dict: pass --config with the HF "
                               "config.json")
        cfg = dict(config)
        cfg.setdefault("model_type", "retnet")
        cfg["family"] = "fla"
    if plan is not None:
        vocab = cfg.get("vocab_size")
        convert_tokenizer.check_vocab_size(
            plan, vocab if isinstance(vocab, int) and vocab > 0 else None)
    sd = _cast(sd, dtype)
    sd = {k: v.contiguous() for k, v in sd.items()}
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")
    save_file(sd, os.path.join(out_dir, "model.safetensors"),
              metadata={"format": "pt",
                        "source": os.path.basename(src_path)})
    if plan is not None:
        lines = convert_tokenizer.write_tokenizer(plan, out_dir)
        for name, reason in plan.skipped:
            warn(f"tokenizer: not carried: "
                 f"{os.path.join(plan.source_dir, name)}: {reason}")
        for w in plan.warnings:
            warn(f"tokenizer: {w}")
        if report is not None:
            report.extend(lines)
    if do_verify:
        try:
            verify(out_dir)
        except ConvertError:
            raise
        except Exception as e:  # noqa: BLE001 - report as conversion error
            raise ConvertError(f"the converted checkpoint does not load: "
                               f"{e}") from None
    return cfg, sd


def _parse_mlp_mult(text):
    try:
        v = json.loads(text)
    except json.JSONDecodeError:
        raise argparse.ArgumentTypeError("--mlp-mult: int or JSON list") \
            from None
    if not (isinstance(v, int) or (isinstance(v, list) and
                                   all(isinstance(x, int) for x in v))):
        raise argparse.ArgumentTypeError("--mlp-mult: int or JSON list")
    return v


class _ArgParser(argparse.ArgumentParser):
    def error(self, message):
        raise ConvertError(message)


def main(argv=None):
    ap = _ArgParser(description=__doc__.split("\n\n")[0],
                    formatter_class=argparse.RawDescriptionHelpFormatter,
                    epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("input", help=".pt checkpoint or state_dict")
    ap.add_argument("out_dir", help="output directory")
    ap.add_argument("--family", default="auto",
                    choices=["auto", "torchscale", "seed", "fla"])
    ap.add_argument("--config", help="JSON file or object: model config "
                    "(overrides the checkpoint's cfg/args)")
    ap.add_argument("--seed-args", help="JSON file or object: seed RetNet "
                    "constructor args")
    for name, typ in (("num-layer", int), ("num-heads", int),
                      ("dim-model", int), ("value-factor", int),
                      ("msr-gate-fn", str), ("mlp-gate-fn", str),
                      ("mlp-mult", _parse_mlp_mult)):
        ap.add_argument("--" + name, type=typ, default=None,
                        help="seed constructor arg (overrides --seed-args)")
    ap.add_argument("--mlp-bias", default=None,
                    action=argparse.BooleanOptionalAction)
    ap.add_argument("--dtype", default=None,
                    choices=["float32", "bfloat16", "float16"],
                    help="cast weights (decay/angle buffers stay float32)")
    ap.add_argument("--no-verify", action="store_true",
                    help="skip loading the result with retnet_ref")
    ap.add_argument("--tokenizer-dir", help="take the tokenizer files from "
                    "this directory instead of the checkpoint's")
    ap.add_argument("--fairseq-dict", help="fairseq dict.txt of a GPT-2 BPE "
                    "model (default: DIR/dict.txt with encoder.json and "
                    "vocab.bpe)")
    ap.add_argument("--gpt2-encoder", help="GPT-2 encoder.json (default: "
                    "next to dict.txt)")
    ap.add_argument("--gpt2-bpe", help="GPT-2 vocab.bpe (default: next to "
                    "dict.txt)")
    ap.add_argument("--no-tokenizer", action="store_true",
                    help="write no tokenizer files")
    try:
        args = ap.parse_args(argv)
        seed_args = read_json_arg(args.seed_args, "--seed-args")
        for k in SEED_FIELDS:
            v = getattr(args, k)
            if v is not None:
                seed_args[k] = v
        config = read_json_arg(args.config, "--config")
        report = []
        cfg, sd = convert(args.input, args.out_dir, args.family, config,
                          seed_args,
                          getattr(torch, args.dtype) if args.dtype else None,
                          not args.no_verify, not args.no_tokenizer,
                          args.tokenizer_dir, args.fairseq_dict,
                          args.gpt2_encoder, args.gpt2_bpe, report)
    except (ConvertError, TokenizerError, OSError, ValueError,
            KeyError) as e:
        msg = " ".join(str(e).split())
        print(f"convert_checkpoint: error: {msg}", file=sys.stderr)
        return 1
    n_params = sum(v.numel() for v in sd.values())
    print(f"wrote {args.out_dir}: family {cfg['family']}, {len(sd)} tensors, "
          f"{n_params:,} elements")
    for line in report:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
