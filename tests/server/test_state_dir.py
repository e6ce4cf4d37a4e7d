"""The state directory against real retnet-server processes (127.0.0.1, port 0).

usage: test_state_dir.py --server build/bin/retnet-server --stubs build/python

Checks (each fails if the feature it names is broken):
1. disk full with --state-dir-write-through (RLIMIT_FSIZE on the server, SIGXFSZ ignored, so write()
   returns EFBIG): the turn whose write-through fails ends with UNAVAILABLE naming the save; the
   previous snapshot file is still there, byte-identical, and no temporary file is left; the
   session is rolled back on that replica; after a SIGKILL another replica restores the last
   acknowledged state (not NOT_FOUND) and continues exactly as that state does;
2. --state-dir that is a regular file, a path under a regular file, a read-only directory (not as
   root: root ignores permissions) is refused at start: exit status 1, one error line; a missing
   creatable path is created;
3. a drain that cannot save every session exits non-zero, says how many failed, and keeps the
   previous snapshot file of each;
4. many sessions at a short --snapshot-interval-s: each changed session is on disk within two
   intervals (plus slack) of its turn, and files of unchanged sessions are not rewritten;
5. temporary files: a dead writer's (this node's naming, pid not running) is removed at start, a
   live process's is kept, another node's is kept until it is an hour old;
6. --state-dir-writers: 0 is refused at start; with 4 writers, concurrent turns and forks on many
   sessions leave every file at its session's last acknowledged state, restored so by a replica
   started after a SIGKILL. (Per-session order and parallel writers are checked deterministically
   by StateDirWritersTest in server_test.cc.)
"""

import argparse
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from harness import FAILURES, check  # noqa: E402


def wait_until(pred, timeout, step=0.01):
    """Polls `pred` until it is true or `timeout` seconds pass; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(step)


def snap_name(session_id):
    return session_id.encode().hex() + ".snap"


def snap_position(data):
    # engine/snapshot.h: "RNSNAP01" | u32 | u64 | 4 x i64 | u32 | i64 position
    return int.from_bytes(data[56:64], "little", signed=True) if len(data) >= 64 else None


def read(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def node_tag():
    """server/state_dir.h NodeTag(): FNV-1a 64 of "<boot id>/<pid namespace link>"."""
    boot = open("/proc/sys/kernel/random/boot_id").read().strip()
    key = (boot + "/" + os.readlink("/proc/self/ns/pid")).encode()
    h = 14695981039346656037
    for b in key:
        h = ((h ^ b) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return "%016x" % h


class Server:
    def __init__(self, binary, tmp, name, state_dir, *extra, fsize=None, wait=True):
        self.name = name
        self.port_file = os.path.join(tmp, name + ".port")
        self.log_path = os.path.join(tmp, name + ".log")
        self.log = open(self.log_path, "w")

        def limit():
            if fsize is not None:
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
                resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

        self.proc = subprocess.Popen(
            [binary, "--listen", "127.0.0.1:0", "--metrics-listen", "", "--http-listen", "", "--port-file", self.port_file,
             "--state-dir", state_dir, "--log-level", "info", *extra],
            stdout=self.log, stderr=self.log, preexec_fn=limit)
        self.target = None
        if wait:
            ok = wait_until(lambda: os.path.exists(self.port_file) or self.proc.poll() is not None, 60)
            if not ok or not os.path.exists(self.port_file):
                raise RuntimeError(f"{name} did not start:\n{self.text()}")
            self.target = f"127.0.0.1:{int(open(self.port_file).read())}"

    def text(self):
        self.log.flush()
        return open(self.log_path).read()

    def terminate(self):
        self.proc.send_signal(signal.SIGTERM)
        return self.wait()

    def wait(self):
        try:
            return self.proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None

    def kill(self):
        self.proc.kill()
        self.proc.wait()

    def close(self):
        if self.proc.poll() is None:
            self.kill()
        self.log.close()


class Api:
    def __init__(self, grpc, pb, pb_grpc, target):
        self.grpc, self.pb = grpc, pb
        self.channel = grpc.insecure_channel(target)
        self.stub = pb_grpc.RetNetStub(self.channel)

    def generate(self, session, text, n):
        """Greedy turn: (token ids, Final or None, error code or None, error details)."""
        pb = self.pb
        req = pb.GenerateRequest(session_id=session, create_session=True, text=text,
                                 sampling=pb.SamplingParams(temperature=0.0),
                                 stopping=pb.StoppingCriteria(max_new_tokens=n, ignore_eos=True))
        tokens, final = [], None
        try:
            for msg in self.stub.Generate(req, timeout=120):
                if msg.HasField("chunk"):
                    tokens += [t.id for t in msg.chunk.tokens]
                else:
                    final = msg.final
            return tokens, final, None, ""
        except self.grpc.RpcError as e:
            return tokens, final, e.code(), e.details()

    def session(self, session):
        try:
            return self.stub.GetSession(self.pb.GetSessionRequest(session_id=session), timeout=30), None
        except self.grpc.RpcError as e:
            return None, e.code()

    def import_session(self, session, data):
        chunks = [self.pb.ImportSessionRequest(session_id=session, data=data[:1 << 20])]
        chunks += [self.pb.ImportSessionRequest(data=data[i:i + (1 << 20)])
                   for i in range(1 << 20, len(data), 1 << 20)]
        return self.stub.ImportSession(iter(chunks), timeout=60)

    def close(self):
        self.channel.close()


def temporaries(d):
    return sorted(n for n in os.listdir(d) if n.startswith(".tmp."))


def test_disk_full_shared(a, tmp):
    grpc, pb, pb_grpc = a
    d = os.path.join(tmp, "shared")
    path = os.path.join(d, snap_name("s"))
    # The size of the first turn's snapshot, from a server without a limit.
    s0 = Server(args.server, tmp, "full-0", d, "--state-dir-write-through", "--snapshot-interval-s", "3600")
    api = Api(grpc, pb, pb_grpc, s0.target)
    _, final, code, _ = api.generate("s", "In the beginning", 5)
    check(final is not None and code is None, "disk full: first turn on an unlimited server")
    api.close()
    check(s0.terminate() == 0, "disk full: the unlimited server drains cleanly")
    s0.close()
    first = read(path)
    if not check(first is not None, "disk full: the first turn's snapshot is on disk"):
        return
    # 8 bytes per token of history: a short turn still fits, a 100-token one does not.
    limit = len(first) + 8 * 40
    sa = Server(args.server, tmp, "full-a", d, "--state-dir-write-through", "--snapshot-interval-s", "3600",
                fsize=limit)
    api = Api(grpc, pb, pb_grpc, sa.target)
    try:
        _, final, code, details = api.generate("s", " and God", 4)
        good = read(path)
        check(final is not None and code is None and good != first and snap_position(good) is not None,
              f"disk full: a turn that fits under the limit is saved ({code} {details})")
        info, _ = api.session("s")
        good_position = info.position if info else None
        check(good_position == snap_position(good), "disk full: the saved file is the session's state")
        tokens, final, code, details = api.generate("s", " said", 100)
        check(final is None and code == grpc.StatusCode.UNAVAILABLE and "not saved" in details,
              f"disk full: the turn that could not be saved ends with UNAVAILABLE naming the save "
              f"({code}: {details})")
        check(len(tokens) > 0, "disk full: (that turn's tokens were streamed before its end)")
        check(read(path) == good, "disk full: the previous snapshot file is still there, byte-identical")
        check(temporaries(d) == [], f"disk full: the failed write left no temporary file ({temporaries(d)})")
        info, _ = api.session("s")
        check(info is not None and info.position == good_position,
              f"disk full: the session is rolled back to its last saved state on that replica "
              f"({info.position if info else None} vs {good_position})")
        check("rolled back" in sa.text(), "disk full: the failed write-through is logged")
    finally:
        api.close()
        sa.kill()  # no drain: only what was acknowledged (write-through) is on disk
        sa.close()
    check(read(path) == good, "disk full: after SIGKILL the file is the last acknowledged state")
    sb = Server(args.server, tmp, "full-b", d, "--state-dir-write-through", "--snapshot-interval-s", "3600")
    api = Api(grpc, pb, pb_grpc, sb.target)
    try:
        info, code = api.session("s")
        check(info is not None and info.position == good_position,
              f"disk full: another replica restores the last acknowledged state ({code}, "
              f"{info.position if info else None} vs {good_position})")
        api.import_session("probe", good)
        want, _, _, _ = api.generate("probe", ", and", 12)
        got, final, code, _ = api.generate("s", ", and", 12)
        check(final is not None and len(got) == 12 and got == want,
              "disk full: it continues exactly as the previous good state does")
    finally:
        api.close()
        check(sb.terminate() == 0, "disk full: the second replica drains cleanly")
        sb.close()


def test_bad_state_dirs(a, tmp):
    base = os.path.join(tmp, "bad")
    os.makedirs(base)
    regular = os.path.join(base, "file")
    open(regular, "w").write("x")
    cases = [("a regular file", regular, "not a directory"),
             ("a path under a regular file", os.path.join(regular, "sub"), "Not a directory")]
    if os.geteuid() != 0:
        ro = os.path.join(base, "readonly")
        os.makedirs(ro)
        os.chmod(ro, 0o555)
        cases.append(("a read-only directory", ro, "not writable"))
    else:
        print("skip a read-only directory: running as root, which ignores permissions", flush=True)
    for i, (what, path, reason) in enumerate(cases):
        s = Server(args.server, tmp, f"bad-{i}", path, wait=False)
        wait_until(lambda: s.proc.poll() is not None or os.path.exists(s.port_file), 60)
        if s.proc.poll() is None:  # it started (or hangs): wrong either way
            s.kill()
        rc = s.proc.returncode
        out = s.text()
        errors = [line for line in out.splitlines() if "[error]" in line]
        check(rc == 1 and len(errors) == 1 and path in errors[0] and reason in errors[0]
              and not os.path.exists(s.port_file),
              f"--state-dir {what}: exit status 1 with one error line ({rc}: {errors})")
        s.close()
    fresh = os.path.join(base, "new", "nested")
    s = Server(args.server, tmp, "bad-fresh", fresh)
    check(os.path.isdir(fresh), "--state-dir missing but creatable: created, the server starts")
    # A state directory is one server's: a second one on it is refused while the first runs.
    second = Server(args.server, tmp, "bad-second", fresh, wait=False)
    wait_until(lambda: second.proc.poll() is not None or os.path.exists(second.port_file), 60)
    if second.proc.poll() is None:
        second.kill()
    errors = [line for line in second.text().splitlines() if "[error]" in line]
    check(second.proc.returncode == 1 and len(errors) == 1 and "in use by another retnet-server" in errors[0],
          f"a second server on a state directory in use: exit status 1 with one error line "
          f"({second.proc.returncode}: {errors})")
    second.close()
    shared = Server(args.server, tmp, "bad-shared", os.path.join(base, "other"), "--state-dir-shared", wait=False)
    wait_until(lambda: shared.proc.poll() is not None or os.path.exists(shared.port_file), 60)
    if shared.proc.poll() is None:
        shared.kill()
    check(shared.proc.returncode == 2 and "--session-store" in shared.text(),
          f"--state-dir-shared (removed) is refused, pointing to --session-store ({shared.proc.returncode})")
    shared.close()
    check(s.terminate() == 0, "--state-dir missing but creatable: drains cleanly")
    s.close()


def test_writers(a, tmp):
    """--state-dir-writers: a bad count is refused at start; with 4 writers, concurrent turns and
    forks on 8 sessions (write-through) leave every file at its session's last acknowledged
    state (a save run out of order or over another one would leave an older position), and a
    replica started after a SIGKILL restores each of them at that position."""
    import threading
    grpc, pb, pb_grpc = a
    d = os.path.join(tmp, "writers")
    bad = Server(args.server, tmp, "writers-bad", d, "--state-dir-writers", "0", wait=False)
    wait_until(lambda: bad.proc.poll() is not None or os.path.exists(bad.port_file), 60)
    if bad.proc.poll() is None:
        bad.kill()
    errors = [line for line in bad.text().splitlines() if "[error]" in line]
    check(bad.proc.returncode == 1 and len(errors) == 1 and "--state-dir-writers" in errors[0],
          f"--state-dir-writers 0: exit status 1 naming the flag ({bad.proc.returncode}: {errors})")
    bad.close()

    s = Server(args.server, tmp, "writers-a", d, "--state-dir-write-through", "--state-dir-writers", "4",
               "--snapshot-interval-s", "3600")
    api = Api(grpc, pb, pb_grpc, s.target)
    names = [f"w{i}" for i in range(8)]
    errors = []

    def client(name):
        for turn in range(4):
            _, final, code, details = api.generate(name, f" turn {turn} of {name}", 3 + turn)
            if final is None:
                errors.append(f"{name} turn {turn}: {code} {details}")
            try:
                api.stub.ForkSession(pb.ForkSessionRequest(session_id=name,
                                                           new_session_id=f"{name}-f{turn}"),
                                     timeout=60)
            except grpc.RpcError as e:
                errors.append(f"{name} fork {turn}: {e.code()} {e.details()}")

    threads = [threading.Thread(target=client, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    check(not errors and not any(t.is_alive() for t in threads),
          f"writers: every concurrent turn and fork is acknowledged ({errors[:3]})")
    everything = names + [f"{n}-f{t}" for n in names for t in range(4)]
    positions = {}
    for name in everything:
        info, code = api.session(name)
        positions[name] = info.position if info else None
    on_disk = {name: snap_position(read(os.path.join(d, snap_name(name)))) for name in everything}
    wrong = [(n, positions[n], on_disk[n]) for n in everything
             if positions[n] is None or positions[n] != on_disk[n]]
    check(not wrong, f"writers: each of {len(everything)} files holds its session's last "
                     f"acknowledged position (wrong: {wrong[:4]})")
    check(temporaries(d) == [], f"writers: no temporary file is left ({temporaries(d)})")
    api.close()
    s.kill()  # no drain: what is on disk was written through
    s.close()
    sb = Server(args.server, tmp, "writers-b", d, "--state-dir-write-through", "--snapshot-interval-s", "3600")
    api = Api(grpc, pb, pb_grpc, sb.target)
    try:
        restored = {}
        for name in everything:
            info, _ = api.session(name)
            restored[name] = info.position if info else None
        check(restored == positions, "writers: another replica restores every session where it was")
    finally:
        api.close()
        check(sb.terminate() == 0, "writers: the second replica drains cleanly")
        sb.close()


def test_drain_exit_status(a, tmp):
    grpc, pb, pb_grpc = a
    d = os.path.join(tmp, "drain")
    s = Server(args.server, tmp, "drain-0", d, "--snapshot-interval-s", "3600")
    api = Api(grpc, pb, pb_grpc, s.target)
    api.generate("a", "Blessed are", 4)
    api.close()
    check(s.terminate() == 0, "drain: with room to write, exit status 0")
    s.close()
    before = read(os.path.join(d, snap_name("a")))
    check(before is not None, "drain: the session's snapshot was written")
    # Room for the port file and the start-up probe, not for a snapshot (0.5 MiB).
    s = Server(args.server, tmp, "drain-1", d, "--snapshot-interval-s", "3600", fsize=4096)
    api = Api(grpc, pb, pb_grpc, s.target)
    _, fa, _, _ = api.generate("a", " the meek", 4)
    _, fb, _, _ = api.generate("b", "Amen", 4)
    api.close()
    check(fa is not None and fb is not None, "drain: turns on two sessions (one restored)")
    rc = s.terminate()
    out = s.text()
    check(rc is not None and rc != 0, f"drain: a drain that could not save every session exits non-zero ({rc})")
    check("drain: 0 of 2 sessions saved" in out and "2 failed" in out,
          "drain: the log says how many were saved and how many failed")
    s.close()
    check(read(os.path.join(d, snap_name("a"))) == before,
          "drain: the previous snapshot file of a session that could not be saved is kept")
    check(read(os.path.join(d, snap_name("b"))) is None and temporaries(d) == [],
          "drain: no partial snapshot and no temporary file is left")


def test_cadence(a, tmp):
    grpc, pb, pb_grpc = a
    d = os.path.join(tmp, "cadence")
    interval, slack, n = 0.2, 0.4, 64
    s = Server(args.server, tmp, "cadence", d, "--snapshot-interval-s", str(interval),
               "--max-sessions", str(n + 8))
    api = Api(grpc, pb, pb_grpc, s.target)
    ids = [f"c{i:02d}" for i in range(n)]
    try:
        position = {}

        def on_disk(sid):
            return snap_position(read(os.path.join(d, snap_name(sid))) or b"") == position[sid]

        for sid in ids:
            _, final, _, _ = api.generate(sid, "Let there be", 2)
            position[sid] = api.session(sid)[0].position
        check(wait_until(lambda: all(on_disk(sid) for sid in ids), 20),
              f"cadence: all {n} sessions are on disk")
        # 1. Change every session; each must be written within about one interval of its turn.
        sent = {}
        for sid in ids:
            sent[sid] = time.time()  # before the turn: an upper bound on how long the write took
            api.generate(sid, " light", 2)
            position[sid] = api.session(sid)[0].position
        check(wait_until(lambda: all(on_disk(sid) for sid in ids), 20),
              "cadence: every changed session is written again")
        lag = {sid: os.stat(os.path.join(d, snap_name(sid))).st_mtime_ns / 1e9 - sent[sid] for sid in ids}
        worst = max(lag.values())
        check(worst <= 2 * interval + slack,
              f"cadence: each changed file is written within 2 x {interval} s + {slack} s of its turn "
              f"(worst {worst:.3f} s, median {sorted(lag.values())[n // 2]:.3f} s)")
        # 2. Unchanged sessions are not rewritten: three rounds proven by a canary's writes.
        stamps = {sid: (os.stat(os.path.join(d, snap_name(sid))).st_ino,
                        os.stat(os.path.join(d, snap_name(sid))).st_mtime_ns) for sid in ids}
        canary = "canary"
        position[canary] = None
        rounds = 0
        for i in range(3):
            api.generate(canary, " and there was", 2)
            position[canary] = api.session(canary)[0].position
            rounds += bool(wait_until(lambda: on_disk(canary), 5))
        after = {sid: (os.stat(os.path.join(d, snap_name(sid))).st_ino,
                       os.stat(os.path.join(d, snap_name(sid))).st_mtime_ns) for sid in ids}
        check(rounds == 3, "cadence: the canary's three changes were written by later rounds")
        rewritten = [sid for sid in ids if after[sid] != stamps[sid]]
        check(rewritten == [], f"cadence: no unchanged session's file is rewritten ({len(rewritten)} were)")
    finally:
        api.close()
        rc = s.terminate()
        check(rc == 0, f"cadence: drains cleanly ({rc})")
        s.close()


def test_temporaries(a, tmp):
    d = os.path.join(tmp, "temps")
    os.makedirs(d)
    tag = node_tag()
    while True:  # a pid that is certainly not running
        p = subprocess.Popen(["true"])
        p.wait()
        try:
            os.kill(p.pid, 0)
        except ProcessLookupError:
            dead = p.pid
            break
    files = {
        "dead": f".tmp.{tag}.{dead}.3",
        "live": f".tmp.{tag}.{os.getpid()}.5",
        "other node, fresh": f".tmp.0123456789abcdef.{dead}.1",
        "other node, two hours old": f".tmp.0123456789abcdef.{dead}.2",
    }
    for name in files.values():
        open(os.path.join(d, name), "w").write("partial")
    old = time.time() - 7200
    os.utime(os.path.join(d, files["other node, two hours old"]), (old, old))
    s = Server(args.server, tmp, "temps", d, "--state-dir-write-through", "--snapshot-interval-s", "3600")
    left = set(temporaries(d))
    check(files["dead"] not in left, "temporaries: a dead writer's temporary file is removed at start")
    check(files["live"] in left, "temporaries: a live process's temporary file is kept (write-through mode)")
    check(files["other node, fresh"] in left, "temporaries: another node's fresh temporary file is kept")
    check(files["other node, two hours old"] not in left,
          "temporaries: another node's hour-old temporary file is removed")
    check(s.terminate() == 0, "temporaries: drains cleanly")
    s.close()


def main():
    global args
    ap = argparse.ArgumentParser()
    ap.add_argument("--server", required=True)
    ap.add_argument("--stubs", required=True)
    ap.add_argument("--only", default="", help="run only the tests whose name contains this")
    args = ap.parse_args()
    sys.path.insert(0, args.stubs)
    import grpc
    from retnet.v1 import retnet_pb2 as pb, retnet_pb2_grpc as pb_grpc
    tmp = tempfile.mkdtemp(prefix="retnet-state-dir-")
    tests = [test_disk_full_shared, test_bad_state_dirs, test_writers, test_drain_exit_status,
             test_cadence, test_temporaries]
    try:
        for t in tests:
            if args.only in t.__name__:
                start = time.monotonic()
                print(f"--- {t.__name__}", flush=True)
                try:
                    t((grpc, pb, pb_grpc), tmp)
                except Exception as e:  # a server that did not start, an unexpected RPC error
                    check(False, f"{t.__name__} raised {type(e).__name__}: {e}")
                print(f"    ({time.monotonic() - start:.1f} s)", flush=True)
    finally:
        if FAILURES or sys.exc_info()[0] is not None:
            for name in sorted(os.listdir(tmp)):
                if name.endswith(".log"):
                    print(f"--- {name} ---\n" + open(os.path.join(tmp, name)).read()[-3000:])
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{len(FAILURES)} failure(s)" if FAILURES else "all checks passed")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
