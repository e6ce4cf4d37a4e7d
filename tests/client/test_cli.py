"""retnet-client against live retnet-server processes (127.0.0.1, port 0).

usage: test_cli.py --client build/bin/retnet-client --server build/bin/retnet-server

Covers the command line as a user meets it: JSON shapes, exit codes and messages for every class of
error, session commands, TLS and API keys, the chat REPL from a pipe and under a pseudo-terminal, and
`bench` against the real server (closed and open loop, multi-turn) with its report checked for
consistency, plus the self-test against the instant server.
"""

import argparse
import csv
import json
import os
import pty
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from harness import FAILURES, ServerProcess, check  # noqa: E402

EXIT_USAGE, EXIT_RPC = 2, 64
CODE = {"INVALID_ARGUMENT": 3, "NOT_FOUND": 5, "RESOURCE_EXHAUSTED": 8, "UNAVAILABLE": 14,
        "UNAUTHENTICATED": 16}


def Server(binary, tmp, name, *extra):
    return ServerProcess(binary, tmp, name, "--log-level", "warn", *extra)


class Cli:
    def __init__(self, binary, target, *global_flags, env=None):
        self.binary, self.target, self.flags, self.env = binary, target, list(global_flags), env

    def run(self, *args, stdin=None, timeout=120, target=True):
        cmd = [self.binary] + (["--target", self.target] if target else []) + self.flags + list(args)
        env = dict(os.environ, **(self.env or {}))
        return subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=timeout, env=env)

    def json(self, *args, **kw):
        p = self.run(*args, **kw)
        if p.returncode != 0:
            raise RuntimeError(f"{args}: exit {p.returncode}: {p.stderr}")
        return json.loads(p.stdout)


def greedy(n):
    return ["--max-new-tokens", str(n), "--temperature", "0", "--ignore-eos"]


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    return port


def ordered(summary):
    return summary["min"] <= summary["p50"] <= summary["p90"] <= summary["p99"] <= summary["max"]


def test_generate_and_sessions(cli):
    a = cli.json("generate", "In the beginning", "--session", "cli-a", *greedy(30), "--json")
    check(set(a) >= {"session_id", "tokens", "text", "finish_reason", "stop_sequence", "usage", "timings"},
          "generate --json has every field")
    check(a["session_id"] == "cli-a" and len(a["tokens"]) == 30 and a["usage"]["completion_tokens"] == 30
          and a["finish_reason"] == "LENGTH", "30 greedy tokens, usage and finish reason")
    check(bytes(a["tokens"]).decode("utf-8", "replace") == a["text"], "the text is the bytes of the ids")
    check(a["usage"]["state_bytes"] > 0 and a["timings"]["total_ms"] >= a["timings"]["first_token_ms"] > 0,
          "state bytes and timings")
    text = cli.run("generate", "In the beginning", "--session", "cli-b", *greedy(30))
    check(text.returncode == 0 and text.stdout == a["text"] + "\n", "text mode streams the same text")
    ids = ",".join(str(b) for b in b"In the beginning")
    t = cli.json("generate", "--tokens", ids, "--session", "cli-c", *greedy(30), "--json")
    check(t["tokens"] == a["tokens"], "--tokens prompt equals the text prompt")
    piped = cli.json("generate", "-", "--session", "cli-d", *greedy(30), "--json", stdin="In the beginning")
    check(piped["tokens"] == a["tokens"], "prompt '-' reads standard input")

    stop = cli.json("generate", "In the beginning", "--session", "cli-stop", *greedy(60), "--stop", "LORD",
                    "--json")
    check(stop["finish_reason"] == "STOP_SEQUENCE" and stop["stop_sequence"] == "LORD"
          and "LORD" not in stop["text"], "--stop ends on the string and never emits it")
    lp = cli.json("generate", "And God", "--session", "cli-lp", *greedy(5), "--logprobs", "2", "--json")
    check(len(lp["logprobs"]) == 5 and all(len(e["top"]) == 2 and e["logprob"] <= 0 for e in lp["logprobs"])
          and [e["id"] for e in lp["logprobs"]] == lp["tokens"], "--logprobs 2: chosen and top-2 per token")
    seeded = [cli.json("generate", "And God", "--session", f"cli-seed{i}", "--max-new-tokens", "20",
                       "--temperature", "0.9", "--top-k", "40", "--seed", "7", "--ignore-eos", "--json")["tokens"]
              for i in range(2)]
    check(seeded[0] == seeded[1], "sampling with --seed is reproducible")

    # A session continued across two calls, then session commands.
    first = cli.json("generate", "And God", "--session", "cli-e", *greedy(10), "--json")
    second = cli.json("generate", " said", "--session", "cli-e", *greedy(10), "--json")
    convo = list(b"And God") + first["tokens"] + list(b" said")
    whole = cli.json("generate", "--tokens", ",".join(map(str, convo)), "--session", "cli-f", *greedy(10),
                     "--json")
    check(second["tokens"] == whole["tokens"], "a continued session equals one pass over the conversation")
    info = cli.json("session", "info", "cli-e", "--json")
    check(info["position"] == 1 + len(convo) + 10 - 1 and info["pending_token"] == second["tokens"][-1],
          "session info: position and pending token")
    listed = [json.loads(line)["session_id"] for line in cli.run("session", "list", "--json").stdout.splitlines()]
    check({"cli-a", "cli-e", "cli-f"} <= set(listed), "session list shows the sessions")
    fork = cli.json("session", "fork", "cli-e", "cli-e2", "--json")
    check(fork["session_id"] == "cli-e2" and fork["position"] == info["position"], "session fork copies the state")
    after = [cli.json("generate", ", and", "--session", s, *greedy(12), "--json")["tokens"] for s in ("cli-e", "cli-e2")]
    check(after[0] == after[1], "a fork continues exactly like its source")

    with tempfile.TemporaryDirectory() as tmp:
        snap = os.path.join(tmp, "e.snap")
        ex = cli.run("session", "export", "cli-f", snap)
        check(ex.returncode == 0 and os.path.getsize(snap) > info["position"], "session export writes a file")
        im = cli.json("session", "import", snap, "--id", "cli-f2", "--json")
        check(im["session_id"] == "cli-f2", "session import names the session")
        cont = [cli.json("generate", " unto", "--session", s, *greedy(12), "--json")["tokens"]
                for s in ("cli-f", "cli-f2")]
        check(cont[0] == cont[1], "an imported snapshot continues exactly like the original")
        with open(os.path.join(tmp, "junk.snap"), "wb") as f:
            f.write(b"not a snapshot")
        bad = cli.run("session", "import", os.path.join(tmp, "junk.snap"))
        check(bad.returncode == EXIT_RPC + CODE["INVALID_ARGUMENT"], "importing junk is INVALID_ARGUMENT")
        missing = cli.run("session", "import", os.path.join(tmp, "absent.snap"))
        check(missing.returncode == 3 and "cannot read" in missing.stderr, "a missing file is a local error (3)")

    d = cli.run("session", "delete", "cli-e2")
    gone = cli.run("session", "info", "cli-e2")
    check(d.returncode == 0 and gone.returncode == EXIT_RPC + CODE["NOT_FOUND"]
          and "NOT_FOUND" in gone.stderr and "hint:" in gone.stderr,
          "a deleted session answers NOT_FOUND (exit 69) with a hint")

    tok = cli.json("tokenize", "hi", "--add-bos", "--json")
    check(tok["ids"] == [256, 104, 105], "tokenize --add-bos")
    de = cli.run("detokenize", "104", "105")
    check(de.stdout == "hi\n", "detokenize")
    m = cli.json("model", "--json")
    check(m["vocab_size"] == 258 and m["state_bytes_per_session"] == a["usage"]["state_bytes"],
          "model --json describes the served model")
    h = cli.run("health")
    check(h.returncode == 0 and h.stdout.strip() == "SERVING", "health: SERVING, exit 0")
    env_target = Cli(cli.binary, "", env={"RETNET_TARGET": cli.target}).run("health", target=False)
    check(env_target.returncode == 0, "RETNET_TARGET sets the address")


def test_errors(cli):
    neg = cli.run("generate", "x", "--temperature", "-1")
    check(neg.returncode == EXIT_RPC + CODE["INVALID_ARGUMENT"] and "temperature" in neg.stderr,
          "invalid sampling: exit 67, the message names the field")
    check(cli.run("generate", "x", "--bogus").returncode == EXIT_USAGE, "unknown flag: exit 2")
    check(cli.run("generate", "--tokens", "1,x").returncode == EXIT_USAGE, "bad --tokens: exit 2")
    check(cli.run("bench", "--prompt-tokens", "9:3").returncode == EXIT_USAGE, "bad range: exit 2")
    check(cli.run().returncode == EXIT_USAGE, "no command: exit 2")
    dead = Cli(cli.binary, f"127.0.0.1:{free_port()}", "--timeout", "3").run("model")
    check(dead.returncode == EXIT_RPC + CODE["UNAVAILABLE"] and "--target" in dead.stderr,
          "nothing listening: UNAVAILABLE (exit 78) and a hint about --target")


def test_secured(client_bin, server_bin, tmp):
    cert, key, keys = (os.path.join(tmp, n) for n in ("cert.pem", "key.pem", "keys.txt"))
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "1", "-subj", "/CN=retnet-test", "-addext",
                    "subjectAltName=DNS:retnet.test,IP:127.0.0.1"], check=True, capture_output=True)
    with open(keys, "w") as f:
        f.write("secret-key\n")
    srv = Server(server_bin, tmp, "secured", "--tls-cert", cert, "--tls-key", key, "--api-keys-file", keys,
                 "--max-sessions", "1", "--max-host-sessions", "0")
    try:
        anon = Cli(client_bin, srv.target, "--tls-ca", cert).run("model")
        check(anon.returncode == EXIT_RPC + CODE["UNAUTHENTICATED"] and "--api-key" in anon.stderr,
              "TLS without a key: UNAUTHENTICATED (exit 80), hint names --api-key")
        ok = Cli(client_bin, srv.target, "--tls-ca", cert, "--api-key", "secret-key")
        check(ok.run("generate", "In", "--session", "one", *greedy(4)).returncode == 0, "TLS + --api-key works")
        via_env = Cli(client_bin, srv.target, "--tls-ca", cert, "--tls-server-name", "retnet.test",
                      env={"RETNET_API_KEY": "secret-key"})
        check(via_env.run("session", "info", "one").returncode == 0,
              "RETNET_API_KEY and --tls-server-name work")
        full = ok.run("generate", "In", "--session", "two", *greedy(4))
        check(full.returncode == EXIT_RPC + CODE["RESOURCE_EXHAUSTED"] and "capacity" in full.stderr,
              "no free slot: RESOURCE_EXHAUSTED (exit 72) with what to do about it")
        plain = Cli(client_bin, srv.target, "--api-key", "secret-key", "--timeout", "3").run("model")
        check(plain.returncode == EXIT_RPC + CODE["UNAVAILABLE"], "plaintext against a TLS server: UNAVAILABLE")
    finally:
        srv.stop()


def test_chat_pipe(cli):
    out = cli.run("chat", "--session", "chat-a", *greedy(20),
                  stdin="In the beginning\n/info\n/fork chat-b\n and\n/quit\n")
    ref = cli.json("generate", "In the beginning", "--session", "chat-ref", *greedy(20), "--json")
    lines = out.stdout.splitlines()
    check(out.returncode == 0 and lines and lines[0] == ref["text"],
          "chat from a pipe: the first turn equals generate on a new session")
    check(any(l.startswith("chat-a ") and "position" in l for l in lines), "chat /info shows the session")
    check("forked chat-a -> chat-b; now on chat-b" in lines, "chat /fork switches to the copy")
    a, b = cli.json("session", "info", "chat-a", "--json"), cli.json("session", "info", "chat-b", "--json")
    check(b["position"] > a["position"], "the turn after /fork went to the fork, not the source")


class Pty:
    """A child process on a pseudo-terminal; every read and the final wait are bounded."""

    def __init__(self, argv):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:
            os.execv(argv[0], argv)
        self.buf = b""

    def read_until(self, marker, limit_s=60):
        """Reads into `buf` until `marker` is in it, the child closes the terminal, or time is up."""
        deadline = time.monotonic() + limit_s
        while marker not in self.buf and time.monotonic() < deadline:
            r, _, _ = select.select([self.fd], [], [], max(0.0, deadline - time.monotonic()))
            if not r:
                break
            try:
                data = os.read(self.fd, 4096)
            except OSError:
                break
            if not data:
                break
            self.buf += data
        return marker in self.buf

    def write(self, data):
        os.write(self.fd, data)

    def wait(self):
        """The child's exit status (killed after 10 s)."""
        for _ in range(1000):
            done, status = os.waitpid(self.pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.01)
        else:
            os.kill(self.pid, signal.SIGKILL)
            _, status = os.waitpid(self.pid, 0)
        os.close(self.fd)
        return status


def test_chat_pty(cli):
    t = Pty([cli.binary, "--target", cli.target, "chat", "--session", "chat-pty", *greedy(16)])
    try:
        check(t.read_until(b"> ") and b"chat on session chat-pty" in t.buf, "pty: banner and prompt")
        t.buf = b""
        t.write(b"In the beginning\n")
        got = t.read_until(b"\n> ")
        ref = cli.json("generate", "In the beginning", "--session", "chat-pty-ref", *greedy(16), "--json")
        check(got and ref["text"].encode() in t.buf, "pty: the turn streams the model's text, then a prompt")
        t.buf = b""
        t.write(b"/help\n")
        check(t.read_until(b"/quit") and t.read_until(b"> "), "pty: /help lists the commands")
        t.write(b"/quit\n")
        t.read_until(b"\x00", limit_s=10)  # drain until the child closes the terminal
    finally:
        status = t.wait()
    check(os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, "pty: /quit exits 0")


def test_bench_progress_pty(cli):
    """On a terminal, bench draws a live progress line on stderr (and none from a pipe)."""
    t = Pty([cli.binary, "--target", cli.target, "bench", "-c", "2", "-n", "12", "--output-tokens", "32"])
    try:
        t.read_until(b"\x00", limit_s=120)  # everything, until the child closes the terminal
    finally:
        status = t.wait()
    check(os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0 and b"\r[" in t.buf and b"100.0%" in t.buf
          and b"12 requests" in t.buf, "bench on a terminal: a live progress line that reaches 100%")
    piped = cli.run("bench", "-c", "2", "-n", "4", "--output-tokens", "8")
    check(piped.returncode == 0 and "\r[" not in piped.stderr, "bench from a pipe: no progress line")


def test_bench(cli, tmp):
    rep, csv_path = os.path.join(tmp, "bench.json"), os.path.join(tmp, "bench.csv")
    p = cli.run("bench", "-c", "4", "--duration", "3", "--warmup", "2", "--prompt-tokens", "8:32",
                "--output-tokens", "8:24", "--turns", "2", "--slo-ttft-ms", "60000", "--seed", "3",
                "--json", rep, "--csv", csv_path, timeout=300)
    check(p.returncode == 0 and "TTFT" in p.stdout and "follow-up turns" in p.stdout,
          "bench prints its table (closed loop, 2 turns)")
    r = json.load(open(rep))
    rows = list(csv.DictReader(open(csv_path)))
    req = r["requests"]
    check(req["sent"] == req["completed"] + req["failed"] == len(rows) and req["completed"] > 8,
          f"bench: counts add up ({req})")
    check(req["failed"] == 0 and r["errors"] == {} and r["token_count_mismatches"] == 0,
          "bench: no errors, streamed tokens equal the server's usage")
    check(r["output_tokens"] == sum(int(x["output_tokens"]) for x in rows)
          and r["prompt_tokens"] == sum(int(x["prompt_tokens"]) for x in rows), "bench: token sums match the CSV")
    check(all(8 <= int(x["prompt_tokens"]) <= 32 and 8 <= int(x["output_tokens"]) <= 24 for x in rows),
          "bench: lengths drawn from the ranges")
    lat = r["latency"]
    check(all(ordered(lat[k]) for k in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms")), "bench: percentiles ordered")
    # (tokens merged into a request's first message have no gap of their own)
    check(lat["ttft_ms"]["count"] == req["completed"]
          and 0.9 * (r["output_tokens"] - req["completed"]) <= lat["itl_ms"]["count"]
          <= r["output_tokens"] - req["completed"], "bench: one TTFT per request, an ITL per later token")
    check(lat["ttft_ms"]["mean"] <= lat["e2el_ms"]["mean"], "bench: TTFT before E2E")
    check(r["first_turns"]["e2el_ms"]["count"] + r["followup_turns"]["e2el_ms"]["count"] == req["completed"]
          and r["followup_turns"]["e2el_ms"]["count"] > 0, "bench: first and follow-up turns reported apart")
    check(abs(r["request_throughput"] * r["duration_s"] - req["completed"]) < 1e-6
          and r["duration_s"] >= 3.0, "bench: throughput = completed / duration, ran the duration")
    check(r["goodput"]["requests"] == req["completed"], "bench: goodput counts requests meeting the target")
    left = [json.loads(l)["session_id"] for l in cli.run("session", "list", "--json").stdout.splitlines()]
    check(not any(s.startswith("bench-") for s in left), "bench deletes its sessions")

    o = cli.json("bench", "--rate", "25", "-n", "20", "-c", "8", "--output-tokens", "8", "--json", "-")
    check(o["config"]["mode"] == "open" and o["requests"]["completed"] == 20 and o["errors"] == {},
          "bench open loop (Poisson) completes its requests")
    # 20 arrivals at 25/s take about 0.8 s; the run ends with its last request, not an arrival later.
    check(o["duration_s"] < 20 / 25 * 3 + 1, f"bench open loop ends with its last request ({o['duration_s']:.2f} s)")
    slow = cli.json("bench", "--rate", "0.2", "--duration", "1", "--output-tokens", "4", "--json", "-")
    check(slow["duration_s"] < 1.5 and slow["requests"]["sent"] >= 1,
          f"bench open loop: the first user arrives at once and the run stops at --duration "
          f"({slow['duration_s']:.2f} s, {slow['requests']['sent']} sent)")
    tight = cli.json("bench", "-c", "2", "-n", "6", "--output-tokens", "16", "--slo-tpot-ms", "0.000001",
                     "--json", "-")
    check(tight["requests"]["completed"] == 6 and tight["goodput"]["requests"] == 0,
          "bench: -n 6 sends 6; an impossible TPOT target gives zero goodput")

    st = cli.json("bench", "--self-test", "-c", "2", "-n", "20", "--output-tokens", "200", "--json", "-")
    check(st["self_test"] and st["requests"]["completed"] == 20 and st["output_tokens"] == 4000,
          "bench --self-test runs against the instant server")
    real_itl = lat["itl_ms"]["mean"]
    check(st["latency"]["itl_ms"]["mean"] < 0.1 * real_itl,
          f"client overhead per token ({st['latency']['itl_ms']['mean'] * 1e3:.1f} us) is under a tenth of "
          f"the server's ITL ({real_itl * 1e3:.0f} us)")


def test_retries(client_bin, stubs):
    """A call refused with UNAVAILABLE (a replica loading or draining) is retried with backoff."""
    sys.path.insert(0, stubs)
    from concurrent import futures

    import grpc
    from retnet.v1 import retnet_pb2 as pb
    from retnet.v1 import retnet_pb2_grpc as pb_grpc

    class Flaky(pb_grpc.RetNetServicer):
        calls = 0
        # What the first calls end with: a refusal, then what gRPC core answers a call that
        # reaches a server whose shutdown has begun (CANCELLED before any handler runs).
        first = [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED]

        def GetModelInfo(self, request, context):
            Flaky.calls += 1
            if Flaky.calls <= len(Flaky.first):
                context.abort(Flaky.first[Flaky.calls - 1], "server is loading the model; retry shortly")
            return pb.ModelInfo(family="flaky", vocab_size=3)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_RetNetServicer_to_server(Flaky(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        cli = Cli(client_bin, f"127.0.0.1:{port}")
        p = cli.run("model", "--json")
        check(p.returncode == 0 and json.loads(p.stdout)["family"] == "flaky" and Flaky.calls == 3,
              f"a call refused with UNAVAILABLE, then CANCELLED, succeeds on the third attempt ({Flaky.calls} calls)")
        Flaky.calls = 0
        p = cli.run("--retries", "0", "model")
        check(p.returncode == EXIT_RPC + CODE["UNAVAILABLE"] and Flaky.calls == 1,
              "--retries 0: the refusal is reported at once")
        Flaky.calls = 0
        p = cli.run("--retries", "1", "model")
        check(p.returncode == EXIT_RPC + 1 and Flaky.calls == 2,
              "--retries 1: two attempts, and the second one's status (CANCELLED) is reported")
    finally:
        server.stop(None)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--client", required=True)
    ap.add_argument("--server", required=True)
    ap.add_argument("--stubs", required=True)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        srv = Server(args.server, tmp, "main")
        try:
            cli = Cli(args.client, srv.target)
            test_generate_and_sessions(cli)
            test_errors(cli)
            test_chat_pipe(cli)
            test_chat_pty(cli)
            test_bench(cli, tmp)
            test_bench_progress_pty(cli)
        finally:
            srv.stop()
        test_secured(args.client, args.server, tmp)
    test_retries(args.client, args.stubs)
    print(f"{len(FAILURES)} failure(s)" if FAILURES else "all checks passed")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
