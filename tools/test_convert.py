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
line.  Exits non-zero on any failure.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import golden_cases  # noqa: E402
import retnet_ref  # noqa: E402
from safetensors_io import load_file  # noqa: E402

CONVERTER = os.path.join(HERE, "convert_checkpoint.py")
FAILURES = []


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


def main():
    ap = argparse.ArgumentParser(description="convert_checkpoint.py tests")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", help="keep the work files in this directory")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="test_convert.") as tmp:
        tmp = args.keep or tmp
        os.makedirs(tmp, exist_ok=True)
        test_torchscale(tmp, args.seed)
        test_torchscale_v1(tmp, args.seed)
        test_seed(tmp, args.seed)
        test_rejections(tmp, args.seed)
    if FAILURES:
        print(f"test_convert: {len(FAILURES)} FAILED")
        return 1
    print("test_convert: all passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
