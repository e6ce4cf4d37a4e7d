#!/usr/bin/python3
"""Write-through cost per turn (issue 15): what saving every turn before its end costs.

    scripts/bench-session-store.sh [--turns N] [--out DIR] [--cache DIR]

For the built-in model and a random fla checkpoint with 8 MiB of state per session
(bench_hotpath.py's CONFIG_HEAVY), one server per mode, side by side:
  memory         no store (sessions only in the server's memory): the baseline;
  state-dir      --state-dir DIR --state-dir-write-through (a local file per session, fsync'd);
  redis          --session-store redis://... (a local redis-server, AOF with appendfsync always,
                 what deploy/ runs): lease, fenced write, release;
  redis-everysec the same with appendfsync everysec (Redis's default): the fsync leaves the
                 turn's path, and a Redis crash (not a replica's) may lose the last second.
One client (grpcio) runs 4 conversations on each server, turn after turn (8-token prompts, 16
greedy tokens), the servers' turns alternating; the turn time is from the request to its Final. cost = turn p50 of the mode - turn p50 of memory.
Prints a Markdown table; raw results in OUT/session_store.json.
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [HERE, os.path.join(ROOT, "tests"), os.path.join(ROOT, "client/python")]
import harness  # noqa: E402


def store_write_mean_ms(server):
    """Mean of retnet_session_store_seconds{op="write"} (the fenced write alone), or None."""
    import urllib.request
    text = urllib.request.urlopen(server.base_url + "/metrics", timeout=30).read().decode()
    total = harness.metric_sum(text, "retnet_session_store_seconds_sum", 'op="write"')
    count = harness.metric_sum(text, "retnet_session_store_seconds_count", 'op="write"')
    return total / count * 1e3 if count else None


def start(args, tmp, ckpt, mode, redis):
    extra = ["--checkpoint", ckpt] if ckpt else []
    if mode == "state-dir":
        extra += ["--state-dir", os.path.join(tmp, f"state-{time.time_ns()}"), "--state-dir-write-through"]
    elif mode.startswith("redis"):
        extra += ["--session-store", redis[mode].url, "--session-store-prefix", f"bench{time.time_ns()}:"]
    return harness.ServerProcess(args.server, tmp, f"bench-{mode}", *extra, http=True,
                                 log=os.path.join(args.out, f"server_{mode}.log"))


def run_checkpoint(args, tmp, ckpt, modes, redis):
    """One server per mode, all up at once; the turns alternate between them (one turn on each
    mode in turn), so that drift in the machine's speed falls on every mode alike."""
    from retnet_client import Client
    servers, clients, times = {}, {}, {m: [] for m in modes}
    try:
        for m in modes:
            servers[m] = start(args, tmp, ckpt, m, redis)
            clients[m] = Client(servers[m].target, retries=0, timeout=120)
        convs = [f"conv-{i}" for i in range(4)]
        prompt = list(range(10, 18)) if ckpt else "In the beginning"
        for m in modes:  # warm-up: the sessions exist before the timed turns
            for sid in convs:
                clients[m].complete(prompt, session=sid, max_new_tokens=16, temperature=0, ignore_eos=True)
        for t in range(args.turns):
            sid = convs[t % len(convs)]
            for m in modes:
                t0 = time.perf_counter()
                r = clients[m].complete(prompt, session=sid, max_new_tokens=16, temperature=0, ignore_eos=True)
                times[m].append(time.perf_counter() - t0)
                assert len(r.tokens) == 16
        out = {}
        for m in modes:
            ts = sorted(times[m])
            out[m] = {"p50_ms": statistics.median(ts) * 1e3, "p90_ms": ts[int(len(ts) * 0.9)] * 1e3,
                      "mean_ms": statistics.fmean(ts) * 1e3, "turns": len(ts), "store_write_ms": None,
                      "snapshot_bytes": None}
            if m.startswith("redis"):
                out[m]["store_write_ms"] = store_write_mean_ms(servers[m])
                rc = redis[m].client()
                sizes = [rc.strlen(k) for k in rc.scan_iter(match="bench*:snap", count=1000)]
                out[m]["snapshot_bytes"] = max(sizes) if sizes else None
        return out
    finally:
        for c in clients.values():
            c.close()
        for srv in servers.values():
            srv.stop()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--server", default=os.path.join(ROOT, "build/bin/retnet-server"))
    ap.add_argument("--stubs", default=os.path.join(ROOT, "build/python"))
    ap.add_argument("--redis", default=shutil.which("redis-server") or "/usr/bin/redis-server")
    ap.add_argument("--turns", type=int, default=100)
    ap.add_argument("--out", default=None)
    ap.add_argument("--cache", default=os.path.join(ROOT, "build/bench-cache"))
    args = ap.parse_args()
    sys.path.insert(0, args.stubs)
    args.out = args.out or tempfile.mkdtemp(prefix="bench-store-")
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.cache, exist_ok=True)
    from bench_hotpath import CONFIG_HEAVY, ensure_checkpoint  # noqa: E402  (imports torch)
    heavy = ensure_checkpoint(args.cache, "fla-state-heavy", CONFIG_HEAVY)
    c = CONFIG_HEAVY
    heavy_mib = c["layers"] * c["d"] * (2 * c["d"] // c["heads"]) * 4 / 1048576
    tmp = tempfile.mkdtemp(prefix="store-", dir=args.out)
    redis = {"redis": harness.RedisServer(tmp, "redis", args.redis),
             "redis-everysec": harness.RedisServer(tmp, "redis-everysec", args.redis,
                                                   "--appendfsync", "everysec")}
    modes = ("memory", "state-dir", "redis", "redis-everysec")
    results = {}
    try:
        for label, ckpt in (("built-in model", None), (f"fla, {heavy_mib:.0f} MiB state", heavy)):
            results[label] = run_checkpoint(args, tmp, ckpt, modes, redis)
    finally:
        for r in redis.values():
            r.stop()
    print(f"## Write-through cost per turn ({args.turns} turns over 4 conversations, 8-token "
          f"prompts, 16 greedy tokens, one client)\n")
    print("| checkpoint | store | turn p50 ms | turn p90 ms | cost per turn (p50) | fenced write "
          "in Redis, mean ms | snapshot |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for label, modes in results.items():
        base = modes["memory"]["p50_ms"]
        for m, r in modes.items():
            cost = "baseline" if m == "memory" else f"{r['p50_ms'] - base:+.2f} ms"
            w = f"{r['store_write_ms']:.2f}" if r["store_write_ms"] is not None else ""
            size = f"{r['snapshot_bytes'] / 1048576:.2f} MiB" if r["snapshot_bytes"] else ""
            print(f"| {label} | {m} | {r['p50_ms']:.2f} | {r['p90_ms']:.2f} | {cost} | {w} | {size} |")
    with open(os.path.join(args.out, "session_store.json"), "w") as fh:
        json.dump(results, fh, indent=1)
    print(f"\nraw: {os.path.join(args.out, 'session_store.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
