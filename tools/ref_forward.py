#!/usr/bin/python3
"""retnet-forward's CLI contract implemented with the Python reference.

    ref_forward.py --checkpoint DIR --input IN.safetensors
                   --output OUT.safetensors
                   [--mode parallel|chunkwise|recurrent] [--chunk-size N]
                   [--device cpu] [--dtype float32|float64]

IN holds "tokens" (int64 [B, T]) for language models or "features"
(float32 [B, T, D]) for seed checkpoints; OUT receives "logits" or "hidden"
(float32).  On any error: exit status 1 and exactly one line on stderr.

Used to test check_forward.py itself and as an executable specification of
the contract:  check_forward.py --bin tools/ref_forward.py --cases DIR
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import retnet_ref  # noqa: E402
from safetensors_io import load_file, save_file  # noqa: E402


class _ArgParser(argparse.ArgumentParser):
    def error(self, message):  # one line on stderr, exit 1
        raise ValueError(message)


def run(argv):
    ap = _ArgParser(prog="ref_forward.py", add_help=False)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--input", required=True)
    ap.add_argument("--output", required=True)
    ap.add_argument("--mode", default="parallel",
                    choices=["parallel", "chunkwise", "recurrent"])
    ap.add_argument("--chunk-size", type=int, default=64)
    ap.add_argument("--device", default="cpu", choices=["cpu"])
    ap.add_argument("--dtype", default="float32",
                    choices=["float32", "float64"])
    args = ap.parse_args(argv)
    if not os.path.isdir(args.checkpoint):
        raise ValueError(f"checkpoint directory not found: {args.checkpoint}")
    if args.chunk_size < 1:
        raise ValueError("--chunk-size must be >= 1")
    dtype = getattr(torch, args.dtype)
    model = retnet_ref.load_model(args.checkpoint, dtype)
    inputs = load_file(args.input)
    name = "tokens" if model.takes_tokens else "features"
    if name not in inputs:
        raise ValueError(f"input file has no '{name}' tensor "
                         f"(found: {sorted(inputs) or 'nothing'})")
    x = inputs[name]
    if name == "tokens":
        if x.dtype != torch.int64 or x.dim() != 2:
            raise ValueError("'tokens' must be int64 [B, T]")
        if x.numel() and (x.min() < 0 or x.max() >= model.embed.shape[0]):
            raise ValueError("token id out of range")
    else:
        if not x.is_floating_point() or x.dim() != 3:
            raise ValueError("'features' must be float [B, T, D]")
        x = x.to(dtype)
    with torch.no_grad():
        out = model.forward(x, args.mode, args.chunk_size)
    save_file({model.output_name: out.to(torch.float32).contiguous()},
              args.output)


def main(argv=None):
    try:
        run(sys.argv[1:] if argv is None else argv)
    except Exception as e:  # noqa: BLE001 - CLI boundary
        msg = " ".join(f"{type(e).__name__}: {e}".split())
        print(f"ref_forward: error: {msg}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
