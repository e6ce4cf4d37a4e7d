#!/usr/bin/python3
"""Write the golden test checkpoints for retnet-forward.

    make_goldens.py --out DIR [--seed N] [--cases fla,seed,...]

For every case (see golden_cases.CASE_NAMES) creates DIR/<case>/ with
  config.json          upstream config (+ "family" where needed)
  model.safetensors    float32 tensors under the real upstream key names
  input.safetensors    "tokens" int64 [B, T]  or  "features" float32 [B, T, D]
  expected.safetensors "logits" float32 [B, T, V]  or  "hidden" [B, T, D],
                       the parallel form of retnet_ref in float64
and DIR/cases.txt with one case name per line.  Expected outputs are
computed from the files as written (after the float32 round trip), and the
recurrent form is checked against the parallel one before anything is
declared done.  Deterministic given --seed.
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import golden_cases  # noqa: E402
import retnet_ref  # noqa: E402
from safetensors_io import load_file, save_file  # noqa: E402


def make_case(name, out_dir, seed):
    case = golden_cases.build_case(name, seed)
    case_dir = os.path.join(out_dir, name)
    golden_cases.write_checkpoint(case, case_dir)
    model = retnet_ref.load_model(case_dir, torch.float64)
    x = load_file(os.path.join(case_dir, "input.safetensors"))[
        case.input_name]
    par = model.forward(x, "parallel")
    rec = model.forward(x, "recurrent")
    err = ((rec - par).abs().max() / par.abs().max()).item()
    if not err < 1e-10:
        raise RuntimeError(f"{name}: reference recurrent vs parallel {err}")
    save_file({model.output_name: par.to(torch.float32)},
              os.path.join(case_dir, "expected.safetensors"),
              metadata={"case": name, "mode": "parallel",
                        "reference": "retnet_ref.py float64",
                        "seed": str(seed)})
    return model, x, par


def main(argv=None):
    ap = argparse.ArgumentParser(
        description="Write random RetNet golden checkpoints.")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cases", default=",".join(golden_cases.CASE_NAMES),
                    help="comma-separated subset (default: all)")
    args = ap.parse_args(argv)
    names = [n for n in args.cases.split(",") if n]
    unknown = sorted(set(names) - set(golden_cases.CASE_NAMES))
    if unknown:
        ap.error(f"unknown cases {unknown}; known: {golden_cases.CASE_NAMES}")
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    for name in names:
        model, x, out = make_case(name, args.out, args.seed)
        print(f"{name:18s} {model.family:10s} {model.layout:6s} "
              f"H={model.num_heads} d_k={model.d_k} d_v={model.d_v} "
              f"layers={len(model.layers)} {tuple(x.shape)} -> "
              f"{model.output_name} {tuple(out.shape)} "
              f"max|out|={out.abs().max().item():.3f}")
    with open(os.path.join(args.out, "cases.txt"), "w") as f:
        f.write("".join(n + "\n" for n in names))
    print(f"wrote {len(names)} cases to {args.out} "
          f"in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
