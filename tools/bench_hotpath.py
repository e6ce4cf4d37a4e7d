#!/usr/bin/python3
"""Hot-path benchmark on the CPU (issue 12): model step, gRPC delivery, control work.

    scripts/bench-hotpath.sh [--quick] [--cache DIR] [--out DIR]

(a) decode step: build/bin/retnet-bench-model (--path reference and fast, and auto = what the
    server runs) against tools/eager_retnet.py (plain eager PyTorch, fp32), on the built-in
    model (model/default/) and a random ~125M fla checkpoint (bench_main.cc's Random125M()),
    B = 1, 8, 64; greedy tokens of the C++ model and the eager one must agree (exit 1 if not).
(b) tokens/s received over gRPC (retnet-client bench, 8-token prompts, 256-token outputs) at 1
    and 8 streams against the model step's tokens/s at the same batch (server's path).
(c) inter-token latency p99 of 4 decoding streams on a state-heavy checkpoint (8 MiB of state
    per session, --state-dir --state-dir-write-through) quiet, and while a paced control client
    creates, exports, forks and deletes sessions 4 times a second.
Prints Markdown tables and a summary of the targets; raw results in OUT/results.json.
"""

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))
from eager_retnet import EagerRetNet  # noqa: E402
import harness  # noqa: E402  (tests/harness.py: ServerProcess)

THREADS = 2
CONFIG_125M = dict(d=768, layers=12, heads=6, inter=1024, vocab=32000)  # Random125M()
CONFIG_HEAVY = dict(d=512, layers=8, heads=2, inter=1024, vocab=512)    # 2 x 256x512 fp32 / layer
SEED = 0


def sh(cmd, env, timeout, log=None):
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       env=env, timeout=timeout)
    if log:
        with open(log, "w") as fh:
            fh.write(" ".join(cmd) + "\n" + r.stdout)
    if r.returncode != 0:
        sys.stdout.write(r.stdout[-3000:])
        raise RuntimeError(f"{os.path.basename(cmd[0])} failed with exit code {r.returncode}")
    return r.stdout


def cpu_model():
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def loadavg():
    try:
        return open("/proc/loadavg").read().split()[0]
    except OSError:
        return "?"


def git_rev():
    try:
        return subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              text=True).stdout.strip() or "?"
    except OSError:
        return "?"


# ---------------------------------------------------------------------------------------------
# Checkpoints

def ensure_checkpoint(cache, name, cfg):
    """A random fla checkpoint (tools/bench_gpu.py's make_checkpoint, fp32), written once."""
    path = os.path.join(cache, name)
    stamp = os.path.join(path, "bench_hotpath.json")
    want = dict(cfg, seed=SEED, dtype="float32")
    try:
        if json.load(open(stamp)) == want:
            return path
    except (OSError, ValueError):
        pass
    from bench_gpu import make_checkpoint  # noqa: E402  (imports torch.nn.functional only)
    t0 = time.time()
    make_checkpoint(cfg, path, SEED, torch.float32)
    with open(stamp, "w") as fh:
        json.dump(want, fh)
    print(f"wrote random checkpoint {path} ({time.time() - t0:.1f} s)", flush=True)
    return path


def prompt_for(model):
    if model.config["vocab"] == 258:  # byte tokenizer (the built-in model): a text prompt
        return list(b"In the beginning God created")
    g = torch.Generator().manual_seed(SEED + 1)
    return torch.randint(model.config["vocab"], (16,), generator=g).tolist()


# ---------------------------------------------------------------------------------------------
# (a) the decode step

def cpp_step(args, env, ckpt, path, batches, steps, prompt, label):
    out = os.path.join(args.out, f"bench_model_{label}_{path}.json")
    cmd = [args.bench_model, "--checkpoint", ckpt, "--device", "cpu", "--dtype", "float32",
           "--json", out, "--batches", ",".join(map(str, batches)), "--lengths", "",
           "--steps", str(steps), "--prompt-ids", ",".join(map(str, prompt)),
           "--greedy-steps", str(args.greedy_steps), "--path", path]
    sh(cmd, env, 900, log=out[:-5] + ".log")
    with open(out) as fh:
        r = json.load(fh)
    r["step"] = {d["batch"]: d["step_s"] for d in r["decode"]}
    return r


def eager_step(model, batches, steps):
    """The same protocol as bench_main --json: random state (x0.01), random tokens and
    positions < 4096, 3 warm-up steps, median of 3 repetitions of `steps` steps."""
    res = {}
    g = torch.Generator().manual_seed(SEED)
    with torch.inference_mode():
        for b in batches:
            state = model.new_state(b, 0.01)
            tokens = torch.randint(model.config["vocab"], (b,), generator=g)
            positions = torch.randint(4096, (b,), generator=g)
            for _ in range(3):
                model.step(tokens, positions, state)
            reps = []
            for _ in range(3):
                t0 = time.perf_counter()
                for _ in range(steps):
                    model.step(tokens, positions, state)
                reps.append((time.perf_counter() - t0) / steps)
            res[b] = sorted(reps)[1]
            del state
    return res


def part_a(args, env, models):
    print("\n## (a) Decode step: C++ (retnet-bench-model) vs eager PyTorch (tools/eager_retnet.py)\n")
    print(f"fp32 weights and state, CPU, {THREADS} intra-op threads on both sides "
          f"(OMP_NUM_THREADS={THREADS} for the C++ binary, torch.set_num_threads({THREADS}) here). "
          "Same protocol both sides: random state, random tokens, positions < 4096, 3 warm-up "
          f"steps, median of 3 x N timed steps. Greedy check: {args.greedy_steps} tokens after a "
          "fixed prompt (C++: chunkwise prefill + steps; eager: token-by-token steps).\n")
    results, agree_all = {}, True
    for label, key, ckpt, steps in models:
        model = EagerRetNet.from_dir(ckpt)
        prompt = prompt_for(model)
        cpp = {p: cpp_step(args, env, ckpt, p, args.batches, steps, prompt, key)
               for p in ("reference", "fast", "auto")}
        eager = eager_step(model, args.batches, steps)
        greedy = model.greedy(prompt, args.greedy_steps)
        c = model.config
        print(f"### {label}: {cpp['reference']['model']}")
        print(f"(key_dim {c['key_dim']}, value_dim {c['value_dim']}; state "
              f"{cpp['reference']['state_bytes_per_session'] / 1048576:.2f} MiB/session; "
              f"N = {steps}; C++ fast path: cpu_fast_step={str(cpp['fast'].get('cpu_fast_step')).lower()}, "
              f"auto: cpu_fast_step={str(cpp['auto'].get('cpu_fast_step')).lower()})\n")
        print("| B | C++ reference ms/step (tok/s) | C++ fast ms/step (tok/s) | eager PyTorch "
              "ms/step (tok/s) | fast / reference | reference / eager | fast / eager |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for b in args.batches:
            r, f, e = cpp["reference"]["step"][b], cpp["fast"]["step"][b], eager[b]

            def cell(s):
                return f"{s * 1e3:.3f} ({b / s:,.0f})"
            print(f"| {b} | {cell(r)} | {cell(f)} | {cell(e)} | {r / f:.2f}x | {e / r:.2f}x | "
                  f"{e / f:.2f}x |")
        print("\n(ratios are speedups: tokens/s of the first over the second; > 1 = faster)\n")
        agree = {}
        for p in ("reference", "fast", "auto"):
            got = cpp[p]["greedy"]
            n = 0
            while n < min(len(got), len(greedy)) and got[n] == greedy[n]:
                n += 1
            agree[p] = (n == len(greedy) == len(got), n)
        ok = all(a for a, _ in agree.values())
        agree_all &= ok
        print(f"greedy tokens agree ({label}): {'yes' if ok else 'no'} — "
              + "; ".join(f"{p}: {n}/{len(greedy)} identical" for p, (_, n) in agree.items())
              + f"; prompt {len(prompt)} ids, eager greedy {greedy[:8]}...\n", flush=True)
        results[label] = {"cpp": cpp, "eager_step_s": eager, "eager_greedy": greedy, "ckpt": ckpt,
                          "prompt": prompt, "greedy_agree": ok,
                          "greedy_match": {p: n for p, (_, n) in agree.items()}}
        del model
    return results, agree_all


# ---------------------------------------------------------------------------------------------
# (b) gRPC delivery vs the model step

def client_bench(args, env, target, concurrency, requests, prompt_tokens, output_tokens, warmup,
                 name, cpus=None):
    out = os.path.join(args.out, f"client_bench_{name}.json")
    pin = ["taskset", "-c", cpus] if cpus else []
    cmd = pin + [args.client, "--target", target, "bench", "--concurrency", str(concurrency),
           "--requests", str(requests), "--prompt-tokens", str(prompt_tokens),
           "--output-tokens", str(output_tokens), "--warmup", str(warmup), "--no-progress",
           "--session-prefix", f"hotpath-{name}", "--json", out]
    sh(cmd, env, 900, log=out[:-5] + ".log")
    with open(out) as fh:
        r = json.load(fh)
    if r["requests"]["failed"]:
        raise RuntimeError(f"client bench {name}: {r['requests']['failed']} failed requests: "
                           f"{r['errors']}")
    return r


def part_b(args, env, a_default):
    print("## (b) Tokens/s received over gRPC vs the model step (built-in model)\n")
    streams = [1, 8]
    out_tokens = args.b_output_tokens
    tmp = tempfile.mkdtemp(prefix="b-", dir=args.out)
    server = harness.ServerProcess(args.server, tmp, "b", "--max-sessions", "16",
                                   log=os.path.join(args.out, "server_b.log"))
    res = {}
    try:
        for c in streams:
            res[c] = client_bench(args, env, server.target, c, c * args.b_requests_per_stream, 8,
                                  out_tokens, c, f"b{c}")
    finally:
        server.stop()
    step = a_default["cpp"]["auto"]["step"]
    print(f"retnet-server (built-in model, CPU, float32 weights; the server's model path is auto "
          f"= cpu_fast_step {str(a_default['cpp']['auto'].get('cpu_fast_step')).lower()}), "
          f"OMP_NUM_THREADS={THREADS}; retnet-client bench on the same 2 cores, closed loop, "
          f"8-token prompts, {out_tokens}-token outputs (ignore EOS), {args.b_requests_per_stream} "
          "requests per stream after one warm-up request per stream. Model step = (a)'s "
          "C++ --path auto tokens/s at B = streams.\n")
    print("| streams | gRPC output tok/s | model step tok/s (B = streams) | gRPC / step | "
          "TTFT p50 ms | ITL p50 / p99 ms | model ms/step |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    ratios = {}
    for c in streams:
        r = res[c]
        got = r["output_token_throughput"]
        model_tps = c / step[c]
        ratios[c] = got / model_tps
        lat = r["latency"]
        print(f"| {c} | {got:,.0f} | {model_tps:,.0f} | {ratios[c]:.2f} | "
              f"{lat['ttft_ms']['p50']:.2f} | {lat['itl_ms']['p50']:.2f} / "
              f"{lat['itl_ms']['p99']:.2f} | {step[c] * 1e3:.3f} |")
    print(flush=True)
    pinned = part_b_pinned(args, env, a_default, streams, out_tokens) \
        if (os.cpu_count() or 1) >= 2 and shutil.which("taskset") else None
    return {"bench": res, "ratio": ratios, "pinned": pinned}


def part_b_pinned(args, env, a_default, streams, out_tokens):
    """(b) again with the cores split: the server (1 intra-op thread) on CPU 0, the client on CPU
    1, the model step measured alone on CPU 0 with 1 thread. Separates what the server's loop
    costs from the sharing of 2 cores between the step's threads, gRPC and the client."""
    print("### (b, pinned) server on CPU 0 with 1 intra-op thread, client on CPU 1\n")
    env1 = dict(env, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    ckpt = a_default["ckpt"]
    out = os.path.join(args.out, "bench_model_pinned.json")
    sh(["taskset", "-c", "0", args.bench_model, "--checkpoint", ckpt, "--device", "cpu", "--dtype",
        "float32", "--json", out, "--batches", ",".join(map(str, streams)), "--lengths", "",
        "--steps", "200", "--path", "auto"], env1, 900, log=out[:-5] + ".log")
    with open(out) as fh:
        step = {d["batch"]: d["step_s"] for d in json.load(fh)["decode"]}
    tmp = tempfile.mkdtemp(prefix="bp-", dir=args.out)
    server = harness.ServerProcess(args.server, tmp, "bp", "--max-sessions", "16", "--threads", "1",
                                   log=os.path.join(args.out, "server_b_pinned.log"),
                                   preexec_fn=lambda: os.sched_setaffinity(0, {0}))
    res = {}
    try:
        for c in streams:
            res[c] = client_bench(args, env1, server.target, c, c * args.b_requests_per_stream, 8,
                                  out_tokens, c, f"bp{c}", cpus="1")
    finally:
        server.stop()
    print("| streams | gRPC output tok/s | model step tok/s (1 thread, CPU 0) | gRPC / step | "
          "ITL p50 / p99 ms | model ms/step |")
    print("|---:|---:|---:|---:|---:|---:|")
    ratios = {}
    for c in streams:
        r = res[c]
        got = r["output_token_throughput"]
        model_tps = c / step[c]
        ratios[c] = got / model_tps
        lat = r["latency"]
        print(f"| {c} | {got:,.0f} | {model_tps:,.0f} | {ratios[c]:.2f} | "
              f"{lat['itl_ms']['p50']:.2f} / {lat['itl_ms']['p99']:.2f} | {step[c] * 1e3:.3f} |")
    print(flush=True)
    return {"bench": res, "ratio": ratios}


# ---------------------------------------------------------------------------------------------
# (c) control work vs decoding

class ControlClient:
    """Paced: every 1/rate s, create a session, export its snapshot (streamed), fork it, delete
    both. A cycle that overruns its slot starts the next one at once (the achieved rate is
    reported)."""

    def __init__(self, target, rate):
        sys.path.insert(0, os.path.join(ROOT, "build", "python"))
        sys.path.insert(0, os.path.join(ROOT, "client", "python"))
        from retnet_client import Client
        from retnet.v1 import retnet_pb2 as pb
        self.pb = pb
        self.client = Client(target, timeout=60.0)
        self.stub = self.client._stub  # create/export have no wrapper in retnet_client.py
        self.rate = rate
        self.stop_event = threading.Event()
        self.cycles, self.errors, self.latency, self.exported = 0, [], [], 0
        self.thread = threading.Thread(target=self.run, daemon=True)

    def cycle(self, i):
        pb = self.pb
        sid, fid = f"ctl-{os.getpid()}-{i}", f"ctl-{os.getpid()}-{i}-fork"
        self.stub.CreateSession(pb.CreateSessionRequest(session_id=sid), timeout=60)
        n = 0
        for chunk in self.stub.ExportSession(pb.ExportSessionRequest(session_id=sid), timeout=60):
            n += len(chunk.data)
        self.exported = n
        self.stub.ForkSession(pb.ForkSessionRequest(session_id=sid, new_session_id=fid),
                              timeout=60)
        self.stub.DeleteSession(pb.DeleteSessionRequest(session_id=fid), timeout=60)
        self.stub.DeleteSession(pb.DeleteSessionRequest(session_id=sid), timeout=60)

    def run(self):
        period = 1.0 / self.rate
        start = time.monotonic()
        i = 0
        while not self.stop_event.is_set():
            t0 = time.monotonic()
            try:
                self.cycle(i)
                self.cycles += 1
            except Exception as e:  # grpc.RpcError and parsing errors: counted, not fatal
                self.errors.append(str(e)[:200])
            self.latency.append(time.monotonic() - t0)
            i += 1
            next_at = start + i * period
            self.stop_event.wait(max(0.0, next_at - time.monotonic()))
        self.elapsed = time.monotonic() - start

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop_event.set()
        self.thread.join(timeout=120)
        self.client.close()


def part_c(args, env, ckpt):
    print("## (c) Control work vs decoding (state-heavy checkpoint)\n")
    step4 = cpp_step(args, env, ckpt, "auto", [4], 5, [1, 2, 3], "heavy")["step"][4]
    tmp = tempfile.mkdtemp(prefix="c-", dir=args.out)
    state_dir = os.path.join(tmp, "state")
    os.makedirs(state_dir)
    server = harness.ServerProcess(args.server, tmp, "c", "--checkpoint", ckpt,
                                   "--state-dir", state_dir, "--state-dir-write-through",
                                   "--max-sessions", "32",
                                   log=os.path.join(args.out, "server_c.log"))
    out_tokens, streams = args.c_output_tokens, 4
    try:
        quiet = client_bench(args, env, server.target, streams, streams, 8, out_tokens, streams,
                             "c_quiet")
        with ControlClient(server.target, args.control_rate) as ctl:
            time.sleep(0.5)  # the control load is running before the streams start
            loaded = client_bench(args, env, server.target, streams, streams, 8, out_tokens, 0,
                                  "c_loaded")
        quiet2 = None
        if not args.quick:  # quiet again: how much the quiet number itself moves
            quiet2 = client_bench(args, env, server.target, streams, streams, 8, out_tokens, 0,
                                  "c_quiet2")
    finally:
        server.stop()
    q99, l99 = quiet["latency"]["itl_ms"]["p99"], loaded["latency"]["itl_ms"]["p99"]
    ratio = l99 / q99
    rate = ctl.cycles / ctl.elapsed if ctl.elapsed > 0 else 0
    lat = sorted(ctl.latency) or [0.0]
    c = CONFIG_HEAVY
    print(f"Checkpoint: random fla, {c['layers']} layers, hidden {c['d']}, {c['heads']} heads, "
          f"key_dim {c['d']}, value_dim {2 * c['d']}, vocab {c['vocab']} -> "
          f"{c['layers'] * c['d'] * (2 * c['d'] // c['heads']) * 4 / 1048576:.0f} MiB fp32 state "
          f"per session. retnet-server --state-dir DIR --state-dir-write-through, "
          f"{streams} decoding streams (retnet-client bench, closed loop, 8-token prompts, "
          f"{out_tokens}-token outputs). Control client (Python, grpcio, paced at "
          f"{args.control_rate:g}/s): CreateSession, ExportSession (streamed snapshot, "
          f"{ctl.exported / 1048576:.2f} MiB), ForkSession, DeleteSession x2 per cycle.\n")
    print(f"For scale: the model step alone (retnet-bench-model --path auto, B = {streams}) takes "
          f"{step4 * 1e3:.2f} ms ({streams / step4:,.0f} tok/s).\n")
    print("| run | ITL p50 ms | ITL p90 ms | ITL p99 ms | ITL max ms | output tok/s |")
    print("|---|---:|---:|---:|---:|---:|")
    runs = [("quiet", quiet), ("with control load", loaded)]
    if quiet2:
        runs.append(("quiet again (after)", quiet2))
    for name, r in runs:
        itl = r["latency"]["itl_ms"]
        print(f"| {name} | {itl['p50']:.2f} | {itl['p90']:.2f} | {itl['p99']:.2f} | "
              f"{itl['max']:.2f} | {r['output_token_throughput']:,.0f} |")
    print(f"\nITL p99 with control load / quiet: {ratio:.2f}x. Control cycles: {ctl.cycles} in "
          f"{ctl.elapsed:.1f} s ({rate:.2f}/s achieved), {len(ctl.errors)} errors; cycle time "
          f"p50 {lat[len(lat) // 2] * 1e3:.1f} ms, max {lat[-1] * 1e3:.1f} ms.\n", flush=True)
    if ctl.errors:
        print("control errors (first 3): " + " | ".join(ctl.errors[:3]) + "\n")
    return {"model_step_s_b4": step4, "quiet": quiet, "loaded": loaded, "quiet2": quiet2, "ratio": ratio,
            "control": {"cycles": ctl.cycles, "elapsed_s": ctl.elapsed, "rate": rate,
                        "errors": ctl.errors, "exported_bytes": ctl.exported,
                        "cycle_s": lat}}


# ---------------------------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run (well under a minute)")
    ap.add_argument("--out", default=None, help="logs and results.json (default: a temp dir)")
    ap.add_argument("--cache", default=os.environ.get("RETNET_BENCH_CACHE",
                                                      "/tmp/retnet-bench-hotpath-cache"),
                    help="random checkpoints, written once")
    ap.add_argument("--bin", default=os.path.join(ROOT, "build", "bin"))
    ap.add_argument("--greedy-steps", type=int, default=32)
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: a125m, b, c")
    args = ap.parse_args(argv)
    args.bench_model = os.path.join(args.bin, "retnet-bench-model")
    args.server = os.path.join(args.bin, "retnet-server")
    args.client = os.path.join(args.bin, "retnet-client")
    for b in (args.bench_model, args.server, args.client):
        if not os.access(b, os.X_OK):
            print(f"missing {b}: build it first (cmake --build build --target ...)")
            return 2
    skip = set(filter(None, args.skip.split(",")))
    args.out = args.out or tempfile.mkdtemp(prefix="bench-hotpath-")
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.cache, exist_ok=True)
    if args.quick:
        args.batches, steps_default, steps_125m = [1, 8], 5, 2
        args.b_output_tokens, args.b_requests_per_stream = 64, 1
        args.c_output_tokens = 48
        skip.add("a125m")
    else:
        args.batches, steps_default, steps_125m = [1, 8, 64], 20, 5
        args.b_output_tokens, args.b_requests_per_stream = 256, 2
        args.c_output_tokens = 384
    args.control_rate = 4.0
    torch.set_num_threads(THREADS)
    torch.manual_seed(SEED)
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), MKL_NUM_THREADS=str(THREADS))
    os.environ.update(OMP_NUM_THREADS=str(THREADS), MKL_NUM_THREADS=str(THREADS))  # servers

    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"# Hot-path benchmark (CPU){' — quick smoke run' if args.quick else ''}\n")
    print(f"- date: {now}; git {git_rev()}")
    print(f"- machine: {os.cpu_count()} CPUs (nproc), {cpu_model()}; load average at start "
          f"{loadavg()}")
    print(f"- torch {torch.__version__} (eager side), {THREADS} threads on every side; "
          f"python {platform.python_version()}")
    print(f"- raw results and logs: {args.out}", flush=True)

    models = [("built-in model/default", "default", os.path.join(ROOT, "model", "default"),
               steps_default)]
    if "a125m" not in skip:
        models.append(("random ~125M (Random125M)", "125m",
                       ensure_checkpoint(args.cache, "fla-125m", CONFIG_125M), steps_125m))
    heavy = ensure_checkpoint(args.cache, "fla-state-heavy", CONFIG_HEAVY) if "c" not in skip \
        else None
    t0 = time.time()
    results = {"quick": args.quick, "date": now, "cpu": cpu_model(), "nproc": os.cpu_count(),
               "torch": torch.__version__}
    a, agree = part_a(args, env, models)
    results["a"] = a
    b = part_b(args, env, a[models[0][0]]) if "b" not in skip else None
    results["b"] = b
    c = part_c(args, env, heavy) if "c" not in skip else None
    results["c"] = c

    print("## Summary\n")
    print("| target | measured | met |")
    print("|---|---:|---|")

    def row(what, value, met):
        print(f"| {what} | {value} | {'met' if met else 'not met'} |")
    for label, r in a.items():
        row(f"greedy tokens agree, C++ (reference, fast, auto) vs eager: {label}",
            "yes" if r["greedy_agree"] else "no", r["greedy_agree"])
    d = a[models[0][0]]
    b1 = 1 / d["cpp"]["auto"]["step"][1]
    row("built-in model decode B=1 >= 500 tok/s (perf-model.md §6, CPU CI; server's path)",
        f"{b1:,.0f} tok/s", b1 >= 500)
    if b:
        for s, ratio in b["ratio"].items():
            row(f"gRPC tok/s / model step tok/s >= 0.9 at {s} stream{'s' if s > 1 else ''}",
                f"{ratio:.2f}", ratio >= 0.9)
        for s, ratio in (b.get("pinned") or {}).get("ratio", {}).items():
            row(f"pinned (server CPU 0, client CPU 1): gRPC / step >= 0.9 at {s} "
                f"stream{'s' if s > 1 else ''}", f"{ratio:.2f}", ratio >= 0.9)
    if c:
        row("ITL p99 with control load (4/s create/export/fork/delete) / quiet <= 1.5x",
            f"{c['ratio']:.2f}x ({c['quiet']['latency']['itl_ms']['p99']:.2f} -> "
            f"{c['loaded']['latency']['itl_ms']['p99']:.2f} ms)", c["ratio"] <= 1.5)
    print(f"\n(total {time.time() - t0:.0f} s; load average at end {loadavg()})")
    with open(os.path.join(args.out, "results.json"), "w") as fh:
        json.dump(results, fh, indent=1, default=str)
    if not agree:
        print("\nFAIL: greedy tokens disagree; the speed numbers above do not count.")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
