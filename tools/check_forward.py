#!/usr/bin/python3
"""Compare retnet-forward against the golden outputs of make_goldens.py.

    check_forward.py --bin PATH/retnet-forward --cases DIR [--rtol 1e-4]
                     [--device cpu|cuda] [--dtype float32|bfloat16|float16]
                     [--only fla,seed] [--jobs N] [--timeout S]

For every case listed in DIR/cases.txt and every mode in
  parallel, chunkwise (--chunk-size 1, 7, 16, 64), recurrent
runs
  BIN --checkpoint DIR/<case> --input DIR/<case>/input.safetensors
      --output TMP.safetensors --mode M [--chunk-size N]
      [--device D] [--dtype T]          (only when given to this script)
and computes error = max|out - expected| / max|expected| over the output
tensor ("logits" or "hidden").  A run passes if the tool exits 0, writes a
float32 tensor of the expected name and shape, all finite, and
error <= rtol.  Then two negative checks of the CLI contract: a missing
checkpoint directory and an input file without "tokens" must both exit
non-zero with exactly one line on stderr.

Prints a table and exits 1 on any failure (0 when everything passes).
--bin may contain a wrapper, e.g.
  --bin "/usr/bin/python3 tools/ref_forward.py".
"""

import argparse
import concurrent.futures
import os
import shlex
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from safetensors_io import load_file, save_file  # noqa: E402

MODES = [("parallel", None), ("chunkwise", 1), ("chunkwise", 7),
         ("chunkwise", 16), ("chunkwise", 64), ("recurrent", None)]
DEFAULT_RTOL = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 5e-2}


def _first_line(text, limit=160):
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    s = lines[0] if lines else "(no stderr)"
    if len(lines) > 1:
        s += f" [+{len(lines) - 1} more lines]"
    return s if len(s) <= limit else s[:limit - 3] + "..."


def _read_cases(cases_dir):
    listing = os.path.join(cases_dir, "cases.txt")
    if os.path.isfile(listing):
        with open(listing) as f:
            return [ln.strip() for ln in f if ln.strip()
                    and not ln.startswith("#")]
    return sorted(d for d in os.listdir(cases_dir)
                  if os.path.isfile(os.path.join(cases_dir, d,
                                                 "config.json")))


class Runner:
    def __init__(self, args, tmp):
        self.cmd = shlex.split(args.bin)
        self.args, self.tmp = args, tmp

    def invoke(self, checkpoint, inp, out, mode="parallel", chunk=None):
        cmd = self.cmd + ["--checkpoint", checkpoint, "--input", inp,
                          "--output", out, "--mode", mode]
        if chunk is not None:
            cmd += ["--chunk-size", str(chunk)]
        if self.args.device:
            cmd += ["--device", self.args.device]
        if self.args.dtype:
            cmd += ["--dtype", self.args.dtype]
        try:
            p = subprocess.run(cmd, capture_output=True, text=True,
                               timeout=self.args.timeout)
        except subprocess.TimeoutExpired:
            return None, "", f"timed out after {self.args.timeout}s"
        except OSError as e:
            return None, "", f"cannot run {self.cmd[0]}: {e}"
        return p.returncode, p.stdout, p.stderr

    def check_case_mode(self, case, mode, chunk, rtol):
        """Returns (error or None, message)."""
        case_dir = os.path.join(self.args.cases, case)
        tag = f"{case}-{mode}{chunk or ''}"
        out_path = os.path.join(self.tmp, tag + ".safetensors")
        t0 = time.time()
        rc, _, err = self.invoke(case_dir,
                                 os.path.join(case_dir, "input.safetensors"),
                                 out_path, mode, chunk)
        dt = time.time() - t0
        if rc != 0:
            why = err if rc is None else f"exit {rc}: {_first_line(err)}"
            return None, why, dt
        expected = load_file(os.path.join(case_dir, "expected.safetensors"))
        (name, exp), = expected.items()
        try:
            got = load_file(out_path)
        except (OSError, ValueError) as e:
            return None, f"cannot read output: {e}", dt
        if name not in got:
            return None, f"output lacks '{name}' (has {sorted(got)})", dt
        out = got[name]
        if out.dtype != torch.float32:
            return None, f"'{name}' is {out.dtype}, expected float32", dt
        if out.shape != exp.shape:
            return None, (f"'{name}' shape {tuple(out.shape)}, expected "
                          f"{tuple(exp.shape)}"), dt
        if not torch.isfinite(out).all():
            return None, "non-finite values in output", dt
        e = ((out.double() - exp.double()).abs().max()
             / exp.double().abs().max()).item()
        return e, ("ok" if e <= rtol else f"error {e:.2e} > rtol {rtol:g}"), \
            dt


def negative_checks(runner, cases):
    """CLI contract: failures exit non-zero with exactly one stderr line."""
    results = []
    lm_case = None
    for case in cases:
        inputs = load_file(os.path.join(runner.args.cases, case,
                                        "input.safetensors"))
        if "tokens" in inputs:
            lm_case, tokens = case, inputs["tokens"]
            break
    any_case = cases[0]
    good_input = os.path.join(runner.args.cases, any_case,
                              "input.safetensors")
    checks = [("missing checkpoint dir",
               os.path.join(runner.tmp, "no-such-checkpoint"), good_input)]
    if lm_case is not None:
        bad_input = os.path.join(runner.tmp, "no-tokens.safetensors")
        save_file({"input_ids": tokens}, bad_input)
        checks.append(("input without 'tokens'",
                       os.path.join(runner.args.cases, lm_case), bad_input))
    for label, ckpt, inp in checks:
        out = os.path.join(runner.tmp, "negative.safetensors")
        rc, _, err = runner.invoke(ckpt, inp, out)
        lines = err.rstrip("\n").split("\n") if err.strip() else []
        if rc is None:
            ok, msg = False, err
        elif rc == 0:
            ok, msg = False, "exit 0 (expected failure)"
        elif len(lines) != 1:
            ok, msg = False, (f"exit {rc} but {len(lines)} stderr lines: "
                              f"{_first_line(err)}")
        else:
            ok, msg = True, f"exit {rc}: {lines[0][:100]}"
        results.append((label, ok, msg))
    return results


def main(argv=None):
    ap = argparse.ArgumentParser(
        description="Check retnet-forward against golden outputs.")
    ap.add_argument("--bin", required=True,
                    help="retnet-forward executable (may include a wrapper)")
    ap.add_argument("--cases", required=True, help="make_goldens.py --out DIR")
    ap.add_argument("--rtol", type=float, default=None,
                    help="max|out-exp|/max|exp| bound (default 1e-4 for "
                    "float32, 2e-2 float16, 5e-2 bfloat16)")
    ap.add_argument("--device", default=None,
                    help="pass --device to the tool (default: not passed)")
    ap.add_argument("--dtype", default=None,
                    help="pass --dtype to the tool (default: not passed)")
    ap.add_argument("--only", default=None, help="comma-separated cases")
    ap.add_argument("--jobs", type=int, default=1, help="parallel runs")
    ap.add_argument("--timeout", type=float, default=300,
                    help="seconds per tool run")
    ap.add_argument("--no-negative", action="store_true",
                    help="skip the CLI error-contract checks")
    args = ap.parse_args(argv)
    rtol = args.rtol if args.rtol is not None else \
        DEFAULT_RTOL.get(args.dtype or "float32", 1e-4)

    cases = _read_cases(args.cases)
    if args.only:
        wanted = args.only.split(",")
        missing = sorted(set(wanted) - set(cases))
        if missing:
            ap.error(f"unknown cases {missing}")
        cases = [c for c in cases if c in wanted]
    if not cases:
        ap.error(f"no cases in {args.cases}")

    failures = 0
    with tempfile.TemporaryDirectory(prefix="check_forward.") as tmp:
        runner = Runner(args, tmp)
        jobs = [(c, m, n) for c in cases for m, n in MODES]
        with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as ex:
            results = list(ex.map(
                lambda j: runner.check_case_mode(*j, rtol), jobs))
        w = max(len(c) for c in cases)
        print(f"{'case':{w}s}  {'mode':12s}  {'error':>9s}  {'time':>6s}  "
              f"result (rtol {rtol:g})")
        for (case, mode, chunk), (err, msg, dt) in zip(jobs, results):
            label = f"{mode}/{chunk}" if chunk else mode
            ok = err is not None and err <= rtol
            failures += not ok
            err_s = f"{err:.2e}" if err is not None else "-"
            print(f"{case:{w}s}  {label:12s}  {err_s:>9s}  {dt:5.1f}s  "
                  f"{'PASS' if ok else 'FAIL ' + msg}")
        if not args.no_negative:
            for label, ok, msg in negative_checks(runner, cases):
                failures += not ok
                print(f"negative: {label:24s} {'PASS' if ok else 'FAIL'}  "
                      f"{msg}")
    total = len(jobs) + (0 if args.no_negative else 2)
    print(f"{'FAILED' if failures else 'PASSED'}: "
          f"{total - failures}/{total} checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
