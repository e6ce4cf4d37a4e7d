"""Replicas sharing sessions through a real redis-server (--session-store), all on 127.0.0.1.

usage: test_session_store.py --server BIN --stubs build/python [--redis /usr/bin/redis-server]

Checks, each against real processes:
- 20 races: two turns of one session sent to two replicas at the same moment. Every turn that
  ends OK is kept: replaying the acknowledged turns, in the order they completed, from the
  session's first turn reproduces each of their tokens and the session's next turn exactly; a turn
  that is not served is refused with UNAVAILABLE, never OK and then lost.
- Fencing: a replica stalled (SIGSTOP) mid-turn past its lease resumes and finishes the turn;
  its write is refused (UNAVAILABLE), and the session keeps the turn another replica
  acknowledged meanwhile.
- A turn longer than the lease TTL keeps its lease (renewals) and is acknowledged; a write
  Redis refuses (maxmemory) fails its turn with UNAVAILABLE and the session goes on from its
  last saved turn.
- SIGKILL of a replica mid-stream: the other replica refuses the session (UNAVAILABLE) while the
  dead replica's lease lasts, the lease is gone within its TTL, and the session then continues
  from its last acknowledged turn with exactly the tokens it would have produced.
- Redis SIGKILLed and restarted (AOF, appendfsync always): a replica started afterwards continues
  every acknowledged session exactly.
- Redis unreachable: session turns fail with UNAVAILABLE naming the store, one-shot requests
  still work, nothing crashes; after Redis is back the same replica serves the session again.
- The store's URL: a password (URL or RETNET_SESSION_STORE_PASSWORD) and database are used; a
  wrong password and rediss:// are refused at start with one error line.
- Sessions stay their API key's across replicas; metrics count hand-overs, refusals, store
  latency and errors.
"""

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from harness import FAILURES, RedisServer, ServerProcess, check, metric_sum  # noqa: E402

LEASE_TTL_MS = 3000  # long enough that a loaded CI machine still sees a dead lease refuse
LEASE_WAIT_MS = 600
FIRST = "In the beginning"


def metric(server, name):
    """The sum of every sample of `name` in the replica's /metrics (0 when absent)."""
    return metric_sum(urllib.request.urlopen(server.base_url + "/metrics", timeout=30).read().decode(), name)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--server", required=True)
    ap.add_argument("--stubs", required=True)
    ap.add_argument("--redis", default=shutil.which("redis-server") or "/usr/bin/redis-server")
    args = ap.parse_args()
    if not os.path.exists(args.redis):
        print("redis-server not installed; skipped")
        return 77
    sys.path[:0] = [args.stubs, os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../client/python")]
    import grpc
    from retnet_client import Client

    tmp = tempfile.mkdtemp(prefix="retnet-store-")
    keys = os.path.join(tmp, "keys")
    open(keys, "w").write("alpha-key\nbeta-key\n")
    redis = RedisServer(tmp, "redis", args.redis)
    servers = []

    def replica(name):
        s = ServerProcess(args.server, tmp, name, "--session-store", redis.url,
                          "--session-lease-ttl-ms", str(LEASE_TTL_MS), "--session-lease-wait-ms",
                          str(LEASE_WAIT_MS), "--session-store-timeout-ms", "1000",
                          "--api-keys-file", keys, "--log-level", "info",
                          log=os.path.join(tmp, name + ".log"), http=True)
        servers.append(s)
        return s

    def client(server, key="alpha-key"):
        return Client(server.target, api_key=key, retries=0, timeout=60)

    def greedy(c, prompt, session, n):
        return c.complete(prompt, session=session, max_new_tokens=n, temperature=0, ignore_eos=True)

    def code_of(fn):
        try:
            fn()
            return grpc.StatusCode.OK, ""
        except grpc.RpcError as e:
            return e.code(), e.details() or ""

    try:
        a, b = replica("replica0"), replica("replica1")
        ca, cb = client(a), client(b)
        cs = [ca, cb]
        r = redis.client()

        def lease_keys(session):
            tail = session.encode().hex() + "}:lease"
            return [k for k in r.scan_iter(match="*:lease", count=1000) if k.decode().endswith(tail)]

        # 1. Races. The session's first turn is on one replica; then both replicas get a turn of it
        #    at once. A replica serves a turn only under the session's lease, so the two turns run
        #    one after the other (the second waits up to --session-lease-wait-ms) or one is refused.
        races, both_ok, refused, lost = 20, 0, 0, []
        for i in range(races):
            sid = f"race-{i}"
            home = i % 2
            first = greedy(cs[home], FIRST, sid, 8)
            prompts = [f" and the {i} said", f" then {i} went"]
            barrier = threading.Barrier(2)
            results = [None, None]

            def run(k, c=None, prompt=None, sid=sid, barrier=barrier, results=results):
                barrier.wait(timeout=30)
                try:
                    res = greedy(c, prompt, sid, 24)
                    results[k] = ("OK", res.tokens, time.monotonic(), prompt)
                except grpc.RpcError as e:
                    results[k] = (e.code(), e.details(), time.monotonic(), prompt)

            threads = [threading.Thread(target=run, args=(k, cs[(home + k) % 2], prompts[k])) for k in (0, 1)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=120)
            if any(x is None for x in results):
                lost.append(f"{sid}: a turn did not end")
                continue
            acked = sorted([x for x in results if x[0] == "OK"], key=lambda x: x[2])
            others = [x for x in results if x[0] != "OK"]
            refused += len(others)
            both_ok += len(acked) == 2
            if any(x[0] != grpc.StatusCode.UNAVAILABLE for x in others):
                lost.append(f"{sid}: a turn failed with {[(x[0], x[1]) for x in others]}")
            # The replay: one-shot requests (they touch no session) over the conversation so far.
            convo = list(FIRST.encode()) + first.tokens
            for _, tokens, _, prompt in acked:
                want = greedy(cs[0], convo + list(prompt.encode()), "", 24).tokens
                if tokens != want:
                    lost.append(f"{sid}: the turn '{prompt}' did not see the turns before it")
                convo += list(prompt.encode()) + tokens
            probe = greedy(cs[(home + 1) % 2], " Selah", sid, 8).tokens
            if probe != greedy(cs[0], convo + list(" Selah".encode()), "", 8).tokens:
                lost.append(f"{sid}: the stored session is not the acknowledged conversation")
        check(not lost, f"{races} races of two turns on two replicas: no acknowledged turn lost "
              f"({both_ok} races with both turns served in turn, {refused} turns refused; {lost[:3]})")
        check(both_ok > 0, "turns that meet a lease wait for the hand-over and are then served")
        moved = metric(a, "retnet_session_lease_handovers_total") + metric(b, "retnet_session_lease_handovers_total")
        check(moved >= races, f"hand-overs are counted ({moved:.0f})")
        check(metric(a, "retnet_session_store_seconds_count") > 0,
              "store latency is measured (retnet_session_store_seconds)")
        check(not lease_keys("race-0"), "no lease is left once the turns have ended")
        check(not list(r.scan_iter(match="*:pending:*", count=1000)), "no pending snapshot is left behind")
        r.script_flush()  # Redis forgets the scripts (a restart without AOF of them, a failover)
        check(len(greedy(ca, " Selah", "race-0", 4).tokens) == 4 and len(greedy(cb, " Amen", "race-0", 4).tokens) == 4,
              "after SCRIPT FLUSH the replicas send the scripts again (EVAL) and turns go on")

        # 1b. Fencing: replica 0 stalls (SIGSTOP) in the middle of a turn past its lease; replica 1
        #     takes the session and acknowledges a turn; replica 0 resumes and finishes its turn,
        #     whose write must be refused: it ends with UNAVAILABLE, and the session keeps
        #     replica 1's turn, on both replicas.
        sid = "fenced"
        first = greedy(ca, FIRST, sid, 8)
        pieces = ca.generate(" Amen", session=sid, max_new_tokens=600, temperature=0, ignore_eos=True)
        next(pieces)
        os.kill(a.pid, signal.SIGSTOP)
        try:
            t_end = time.monotonic() + 10
            while lease_keys(sid) and time.monotonic() < t_end:  # bounded: until the lease expires
                time.sleep(0.02)
            taken = greedy(cb, " and then", sid, 12).tokens
        finally:
            os.kill(a.pid, signal.SIGCONT)
        code, details = code_of(lambda: [None for _ in pieces])
        check(code == grpc.StatusCode.UNAVAILABLE and "lost the session's lease" in details,
              f"a turn that outlived its lease is not acknowledged ({code}: {details})")
        convo = list(FIRST.encode()) + first.tokens + list(b" and then") + taken + list(b" Selah")
        want = greedy(ca, convo, "", 8).tokens
        check(greedy(ca, " Selah", sid, 8).tokens == want,
              "its write was fenced off: the session holds the other replica's acknowledged turn")
        check(metric(a, "retnet_session_lease_lost_total") >= 1, "the lost lease is counted")

        # 1c. The store's URL: a password (in the URL or RETNET_SESSION_STORE_PASSWORD) and a
        #     database number; a wrong password and rediss:// are refused at start with one line.
        locked = RedisServer(tmp, "redis-auth", args.redis, "--requirepass", "s3cret")
        try:
            def refused(url):
                p = subprocess.run([args.server, "--listen", "127.0.0.1:0", "--metrics-listen", "",
                                    "--http-listen", "", "--session-store", url],
                                   capture_output=True, text=True, timeout=120)
                errors = [line for line in (p.stdout + p.stderr).splitlines() if "error" in line.lower()]
                return p.returncode, errors
            rc, errors = refused(f"redis://:wrong@127.0.0.1:{locked.port}/3")
            check(rc == 1 and len(errors) == 1 and "--session-store" in errors[0] and "AUTH" in errors[0]
                  and "wrong" not in errors[0],
                  f"a wrong password: exit status 1, one error line without the password ({rc}: {errors})")
            rc, errors = refused(f"rediss://127.0.0.1:{locked.port}/0")
            check(rc == 1 and len(errors) == 1 and "TLS" in errors[0],
                  f"rediss:// is refused, saying why ({rc}: {errors})")
            os.environ["RETNET_SESSION_STORE_PASSWORD"] = "s3cret"
            try:
                authed = ServerProcess(args.server, tmp, "authed", "--session-store",
                                       f"redis://127.0.0.1:{locked.port}/3", log=os.path.join(tmp, "authed.log"))
            finally:
                del os.environ["RETNET_SESSION_STORE_PASSWORD"]
            servers.append(authed)
            with Client(authed.target, retries=0) as c:
                n = len(greedy(c, FIRST, "authed", 4).tokens)
            import redis as redis_py
            db3 = redis_py.Redis(host="127.0.0.1", port=locked.port, db=3, password="s3cret")
            check(n == 4 and any(k.endswith(b":snap") for k in db3.scan_iter(count=1000)),
                  "the password from RETNET_SESSION_STORE_PASSWORD and database 3 are used")
            authed.kill()
        finally:
            locked.kill()

        # 1d. A turn longer than the lease TTL keeps its lease (renewed every TTL/3) and is saved.
        short = ServerProcess(args.server, tmp, "short-lease", "--session-store", redis.url,
                              "--session-lease-ttl-ms", "300", "--api-keys-file", keys,
                              log=os.path.join(tmp, "short-lease.log"), http=True)
        servers.append(short)
        with client(short) as cs_:
            greedy(cs_, FIRST, "long-turn", 4)
            t0 = time.monotonic()
            n = len(greedy(cs_, " Amen", "long-turn", 4000).tokens)
            took = time.monotonic() - t0
            check(n == 4000 and took > 0.3 and cs_.session("long-turn").position == 1 + 16 + 4 + 5 + 4000 - 1,
                  f"a turn of {took:.1f} s under a 300 ms lease is renewed throughout and acknowledged")
        check(metric(short, "retnet_session_lease_lost_total") == 0, "and no lease was lost")
        short.kill()

        # 1e. Redis refuses the write (maxmemory reached, noeviction): the turn fails with
        #     UNAVAILABLE, never OK, and the session goes on from its last saved turn.
        greedy(ca, FIRST, "oom", 8)
        ca.fork_session("oom", "oom-probe")
        want = greedy(ca, " Selah", "oom-probe", 10).tokens
        ca.delete_session("oom-probe")
        r.config_set("maxmemory", str(int(r.info("memory")["used_memory"]) + 64 * 1024))
        try:
            code, details = code_of(lambda: greedy(ca, " and then", "oom", 10))
        finally:
            r.config_set("maxmemory", "0")
        check(code == grpc.StatusCode.UNAVAILABLE and "OOM" in details and "not saved" in details,
              f"a write Redis refuses (OOM) fails its turn with UNAVAILABLE ({code}: {details})")
        check(greedy(cb, " Selah", "oom", 10).tokens == want and greedy(ca, " Amen", "oom", 4).tokens,
              "the session continues from its last saved turn, on either replica")

        # 2. API keys: a session is its key's on every replica.
        greedy(ca, FIRST, "keyed", 4)
        beta = client(b, "beta-key")
        check(code_of(lambda: beta.session("keyed"))[0] == grpc.StatusCode.NOT_FOUND,
              "another API key does not see the session on the other replica")
        check(cb.session("keyed").position > 0, "its own key does")
        beta.close()

        # 3. SIGKILL of replica 0 in the middle of a stream.
        sid = "kill-me"
        greedy(ca, FIRST, sid, 8)
        ca.fork_session(sid, "kill-probe")
        expected = greedy(ca, " and then", "kill-probe", 12).tokens
        ca.delete_session("kill-probe")
        pieces = ca.generate(" Amen", session=sid, max_new_tokens=4000, temperature=0, ignore_eos=True)
        next(pieces)
        check(len(lease_keys(sid)) == 1, "a turn in progress holds the session's lease")
        dead_pid = a.pid
        a.kill()
        t_kill = time.monotonic()
        code, details = code_of(lambda: greedy(cb, " and then", sid, 12))
        check(code == grpc.StatusCode.UNAVAILABLE and "another replica" in details,
              f"while the dead replica's lease lasts the session is refused with UNAVAILABLE ({code}: {details})")
        gone_after = None
        while time.monotonic() - t_kill < 10:  # bounded
            if not lease_keys(sid):
                gone_after = time.monotonic() - t_kill
                break
            time.sleep(0.02)
        check(gone_after is not None and gone_after <= LEASE_TTL_MS / 1000 + 0.5,
              f"the killed replica's lease is gone within the TTL ({gone_after} s, TTL {LEASE_TTL_MS} ms)")
        leftover = [k for k in r.scan_iter(match="*:lease", count=1000)
                    if f"/{dead_pid}/".encode() in (r.hget(k, "owner") or b"")]
        check(not leftover, "no lease of the killed replica is left")
        check(greedy(cb, " and then", sid, 12).tokens == expected,
              "the session continues on the other replica from its last acknowledged turn, exactly")
        check(metric(b, "retnet_session_lease_refused_total") >= 1, "the refused turn is counted")
        for c in cs:
            c.close()

        # 4. Redis SIGKILLed and restarted: nothing acknowledged is lost.
        cb = client(b)
        durable = {}
        for i in range(4):
            s = f"aof-{i}"
            greedy(cb, FIRST, s, 8)
            greedy(cb, f" and {i}", s, 8)
            cb.fork_session(s, "aof-probe")
            durable[s] = greedy(cb, " Selah", "aof-probe", 10).tokens
            cb.delete_session("aof-probe")
        redis.kill()
        redis.restart()
        r = redis.client()
        c2 = replica("replica2")
        cc = client(c2)
        check(all(greedy(cc, " Selah", s, 10).tokens == durable[s] for s in durable),
              "after a Redis SIGKILL and restart a new replica continues every acknowledged session exactly")

        # 5. Redis unreachable, then back.
        greedy(cb, FIRST, "down", 8)
        cb.fork_session("down", "down-probe")
        want = greedy(cb, " Amen", "down-probe", 10).tokens
        cb.delete_session("down-probe")
        redis.kill()
        code, details = code_of(lambda: greedy(cb, " Amen", "down", 10))
        check(code == grpc.StatusCode.UNAVAILABLE and "session store" in details,
              f"Redis down: a session turn fails with UNAVAILABLE naming the store ({code}: {details})")
        check(len(greedy(cb, FIRST, "", 4).tokens) == 4, "Redis down: one-shot requests still work")
        check(b.proc.poll() is None and c2.proc.poll() is None, "Redis down: no replica crashed")
        check(metric(b, "retnet_session_store_errors_total") > 0, "store errors are counted")
        redis.restart()
        check(greedy(cb, " Amen", "down", 10).tokens == want,
              "Redis back: the same replica serves the session again, exactly")
        cb.close()
        cc.close()
    finally:
        for s in servers:
            s.kill()
        redis.kill()
        if FAILURES or sys.exc_info()[0] is not None:
            for s in servers:
                text = open(s.log_path).read()
                odd = [line for line in text.splitlines()
                       if ("code=" in line and "code=OK" not in line) or "[warning]" in line or "[error]" in line]
                print(f"--- {s.name} log: calls not OK, warnings, errors ---\n" + "\n".join(odd[-40:]))
            print("--- redis log (tail) ---\n" + open(redis.log).read()[-2000:])
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{len(FAILURES)} failure(s)" if FAILURES else "all checks passed")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
