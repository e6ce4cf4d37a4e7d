"""A bounded fuzz campaign against a live retnet-server while a greedy canary conversation runs.

usage: test_fuzz.py --server build/bin/retnet-server --stubs build/python [--seed N] [--scale K]

Phases (all against one server on 127.0.0.1, port 0, logging JSON lines at info level):
  1. field-level bad values for every RPC: each must be refused with its defined status code and a
     message naming the field (and never echoing unbounded input);
  2. random byte strings and mutations of valid requests as the raw payload of every method: any
     defined answer is fine, but never UNIMPLEMENTED, INTERNAL, UNKNOWN or UNAVAILABLE;
  3. cancel storms: Generate and Chat streams cancelled after a random few milliseconds;
  4. slow readers (streams never read past their first message) and disconnects (a child process
     holding streams is SIGKILLed).
Meanwhile a canary session runs K greedy turns; they must equal the same turns run alone before
the campaign. Afterwards: the server is alive, health is SERVING, no session is left generating
(bounded poll), RSS grew by less than MAX_RSS_GROWTH_MB, every log line is a JSON object, and every
refused call has its per-RPC log line.
"""

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from harness import ServerProcess, check, finish  # noqa: E402

MAX_RSS_GROWTH_MB = 256
FORBIDDEN = {"UNIMPLEMENTED", "INTERNAL", "UNKNOWN", "UNAVAILABLE"}
CANARY_TURNS = 12
CANARY_TOKENS = 48


def rss_mb(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return 0.0


class Raw:
    """Every retnet.v1.RetNet method with bytes in and bytes out (no client-side parsing)."""

    def __init__(self, grpc, channel, pb):
        self.grpc = grpc
        service = pb.DESCRIPTOR.services_by_name["RetNet"]
        self.kinds = {}
        self.calls = {}
        for m in service.methods:
            kind = {(False, False): "unary_unary", (False, True): "unary_stream",
                    (True, False): "stream_unary", (True, True): "stream_stream"}[
                        (m.client_streaming, m.server_streaming)]
            self.kinds[m.name] = kind
            self.calls[m.name] = getattr(channel, kind)(f"/{service.full_name}/{m.name}")

    def call(self, method, payloads, timeout=20.0, max_messages=4096):
        """(code name, details, responses): `payloads` is one request (bytes) or, for client
        streams, a list of them. Reads at most `max_messages` responses."""
        grpc = self.grpc
        kind = self.kinds[method]
        fn = self.calls[method]
        responses = []
        try:
            if kind == "unary_unary":
                responses.append(fn(payloads, timeout=timeout))
            elif kind == "stream_unary":
                responses.append(fn(iter(payloads), timeout=timeout))
            else:
                it = fn(payloads if kind == "unary_stream" else iter(payloads), timeout=timeout)
                for msg in it:
                    responses.append(msg)
                    if len(responses) >= max_messages:
                        it.cancel()
                        return "CANCELLED", "", responses
            return "OK", "", responses
        except grpc.RpcError as e:
            return e.code().name, e.details() or "", responses


def bad_utf8(msg, field_value):
    """`msg` serialized with the (ASCII) `field_value` replaced by the same bytes with 0xFF."""
    data = msg.SerializeToString()
    token = field_value.encode()
    assert data.count(token) == 1, field_value
    return data.replace(token, token[:-1] + b"\xff")


def field_cases(pb, long_id):
    G = pb.GenerateRequest

    def gen(**kw):
        r = G(session_id="fz-field", create_session=True, text="hi")
        for k, v in kw.items():
            if "." in k:
                outer, inner = k.split(".")
                sub = getattr(r, outer)
                if isinstance(v, dict):
                    getattr(sub, inner).update(v)
                elif isinstance(v, list):
                    getattr(sub, inner).extend(v)
                else:
                    setattr(sub, inner, v)
            else:
                setattr(r, k, v)
        return r

    IA = {"INVALID_ARGUMENT"}
    cases = [
        ("Generate", gen(**{"sampling.temperature": -1.0}), IA, "sampling.temperature"),
        ("Generate", gen(**{"sampling.temperature": float("nan")}), IA, "sampling.temperature"),
        ("Generate", gen(**{"sampling.top_p": 0.0}), IA, "sampling.top_p"),
        ("Generate", gen(**{"sampling.top_p": 1.5}), IA, "sampling.top_p"),
        ("Generate", gen(**{"sampling.top_k": -1}), IA, "sampling.top_k"),
        ("Generate", gen(**{"sampling.min_p": 1.0}), IA, "sampling.min_p"),
        ("Generate", gen(**{"sampling.repetition_penalty": 0.0}), IA, "sampling.repetition_penalty"),
        ("Generate", gen(**{"sampling.presence_penalty": 3.0}), IA, "sampling.presence_penalty"),
        ("Generate", gen(**{"sampling.frequency_penalty": -3.0}), IA, "sampling.frequency_penalty"),
        ("Generate", gen(**{"sampling.logit_bias": {100000: 1.0}}), IA, "sampling.logit_bias"),
        ("Generate", gen(**{"sampling.logit_bias": {5: 101.0}}), IA, "sampling.logit_bias"),
        ("Generate", gen(**{"stopping.max_new_tokens": -1}), IA, "stopping.max_new_tokens"),
        ("Generate", gen(**{"stopping.max_new_tokens": 1 << 40}), IA, "stopping.max_new_tokens"),
        ("Generate", gen(**{"stopping.min_tokens": -1}), IA, "stopping.min_tokens"),
        ("Generate", gen(**{"stopping.stop_token_ids": [-1]}), IA, "stopping.stop_token_ids"),
        ("Generate", gen(**{"stopping.stop": ["x" * 100000]}), IA, "stopping.stop"),
        ("Generate", gen(**{"stopping.stop": [""]}), IA, "stopping.stop"),
        ("Generate", gen(logprobs=-2), IA, "logprobs"),
        ("Generate", gen(logprobs=21), IA, "logprobs"),
        ("Generate", G(session_id=long_id, create_session=True, text="hi"), IA, "session_id"),
        ("Generate", G(session_id="a/b", create_session=True, text="hi"), IA, "session_id"),
        ("Generate", G(session_id="a b", create_session=True, text="hi"), IA, "session_id"),
        ("Generate", G(session_id="fz-none", text="hi"), {"NOT_FOUND"}, "fz-none"),
        ("Generate", G(session_id="fz-field2", create_session=True, tokens=pb.TokenIds(ids=[1 << 40])),
         IA, "tokens.ids"),
        ("Generate", G(session_id="fz-field3", create_session=True, tokens=pb.TokenIds(ids=[-5])), IA, "tokens.ids"),
        ("Generate", G(session_id="fz-field4", create_session=True, text="x" * 5000), IA, "prompt"),
        ("GetSession", pb.GetSessionRequest(session_id=long_id), IA, "session_id"),
        ("GetSession", pb.GetSessionRequest(session_id=""), IA, "session_id"),
        ("GetSession", pb.GetSessionRequest(session_id="fz-none"), {"NOT_FOUND"}, "fz-none"),
        ("DeleteSession", pb.DeleteSessionRequest(session_id=long_id), IA, "session_id"),
        ("ExportSession", pb.ExportSessionRequest(session_id=long_id), IA, "session_id"),
        ("ForkSession", pb.ForkSessionRequest(session_id=long_id), IA, "session_id"),
        ("ForkSession", pb.ForkSessionRequest(session_id="fz-none", new_session_id=long_id), IA,
         "new_session_id"),
        ("CreateSession", pb.CreateSessionRequest(session_id=long_id), IA, "session_id"),
        ("CreateSession", pb.CreateSessionRequest(session_id="bad id"), IA, "session_id"),
        ("Detokenize", pb.DetokenizeRequest(ids=[1 << 40]), IA, "ids"),
        ("Detokenize", pb.DetokenizeRequest(ids=[-1]), IA, "ids"),
    ]
    out = [(m, r.SerializeToString(), codes, field) for m, r, codes, field in cases]
    # Strings that are not UTF-8, in every string field a request has.
    out += [
        ("Generate", bad_utf8(G(session_id="fz-u", create_session=True, text="TEXTVALUE"), "TEXTVALUE"), IA, "text"),
        ("Generate", bad_utf8(gen(**{"stopping.stop": ["STOPVALUE"]}), "STOPVALUE"), IA, "stopping.stop"),
        ("Generate", bad_utf8(G(session_id="SESSIONVALUE", text="hi"), "SESSIONVALUE"), IA, "session_id"),
        ("Tokenize", bad_utf8(pb.TokenizeRequest(text="TEXTVALUE"), "TEXTVALUE"), IA, "text"),
        ("GetSession", bad_utf8(pb.GetSessionRequest(session_id="SESSIONVALUE"), "SESSIONVALUE"), IA, "session_id"),
        ("DeleteSession", bad_utf8(pb.DeleteSessionRequest(session_id="SESSIONVALUE"), "SESSIONVALUE"), IA,
         "session_id"),
        ("ForkSession", bad_utf8(pb.ForkSessionRequest(session_id="a", new_session_id="NEWVALUE"), "NEWVALUE"),
         IA, "new_session_id"),
        ("CreateSession", bad_utf8(pb.CreateSessionRequest(session_id="SESSIONVALUE"), "SESSIONVALUE"), IA,
         "session_id"),
        ("ExportSession", bad_utf8(pb.ExportSessionRequest(session_id="SESSIONVALUE"), "SESSIONVALUE"), IA,
         "session_id"),
    ]
    # Streams: Chat with a bad later message must end in an error; an import with a bad later
    # message must not commit.
    good_turn = pb.ChatRequest(turn=G(session_id="fz-chat", create_session=True, text="hi",
                                      stopping=pb.StoppingCriteria(max_new_tokens=2))).SerializeToString()
    out.append(("Chat", [good_turn, b"\xff\xff\xff"], IA, "request"))
    out.append(("Chat", [bad_utf8(pb.ChatRequest(turn=G(session_id="fz-chat2", create_session=True,
                                                          text="TEXTVALUE")), "TEXTVALUE")], IA, "turn.text"))
    return out


def valid_payloads(pb):
    G = pb.GenerateRequest
    st = pb.StoppingCriteria(max_new_tokens=4)
    return {
        "Generate": G(session_id="fz-m", create_session=True, text="In the", stopping=st).SerializeToString(),
        "Chat": [pb.ChatRequest(turn=G(session_id="fz-c", create_session=True, text="And",
                                       stopping=st)).SerializeToString()],
        "CreateSession": pb.CreateSessionRequest(session_id="fz-new").SerializeToString(),
        "GetSession": pb.GetSessionRequest(session_id="fz-m").SerializeToString(),
        "ListSessions": pb.ListSessionsRequest().SerializeToString(),
        "ForkSession": pb.ForkSessionRequest(session_id="fz-m", new_session_id="fz-f").SerializeToString(),
        "DeleteSession": pb.DeleteSessionRequest(session_id="fz-f").SerializeToString(),
        "ExportSession": pb.ExportSessionRequest(session_id="fz-m").SerializeToString(),
        "ImportSession": [pb.ImportSessionRequest(session_id="fz-i", data=b"RNSNAP\x00\x01" + b"\x00" * 40)
                          .SerializeToString()],
        "Tokenize": pb.TokenizeRequest(text="hello").SerializeToString(),
        "Detokenize": pb.DetokenizeRequest(ids=[72, 105]).SerializeToString(),
        "GetModelInfo": pb.GetModelInfoRequest().SerializeToString(),
    }


def mutate(rng, data):
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(4)
        if op == 0 and b:
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        elif op == 1 and b:
            del b[rng.randrange(len(b)):]
        elif op == 2:
            i = rng.randrange(len(b) + 1)
            b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif b:
            i = rng.randrange(len(b))
            b[i] = rng.choice([0x00, 0x7f, 0x80, 0xff])
    return bytes(b)


class Canary(threading.Thread):
    """Greedy conversations of CANARY_TURNS turns, each on a fresh session, until `stop` is set
    (or once, without one); `conversations` collects each one's per-turn token ids."""

    def __init__(self, client, prefix, stop=None):
        super().__init__(daemon=True)
        self.c, self.prefix, self.stop_event = client, prefix, stop
        self.conversations, self.error = [], None

    def run(self):
        try:
            for n in range(100):  # bounded
                if n > 0 and (self.stop_event is None or self.stop_event.is_set()):
                    return
                turns = []
                self.conversations.append(turns)
                for i in range(CANARY_TURNS):
                    prompt = "In the beginning" if i == 0 else " And"
                    r = self.c.complete(prompt, session=f"{self.prefix}-{n}", max_new_tokens=CANARY_TOKENS,
                                        temperature=0, ignore_eos=True)
                    turns.append(r.tokens)
                self.c.delete_session(f"{self.prefix}-{n}")
        except Exception as e:  # reported by the main thread
            self.error = repr(e)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--server", required=True)
    ap.add_argument("--stubs", required=True)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--scale", type=int, default=1, help="multiplies the random and storm counts")
    ap.add_argument("--skip-missing", action="store_true", help="exit 77 (skipped) when --server is missing")
    args = ap.parse_args()
    if args.skip_missing and not os.path.exists(args.server):
        print(f"skipped: {args.server} was not built")
        return 77
    sys.path.insert(0, args.stubs)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "client", "python"))
    import grpc
    from retnet_client import Client
    from retnet.v1 import retnet_pb2 as pb

    rng = random.Random(args.seed)
    tmp = tempfile.mkdtemp()
    log_path = os.path.join(tmp, "server.log")
    server = ServerProcess(args.server, tmp, "server", "--log-level", "info", "--json-logs",
                           "--max-sessions", "16", "--max-host-sessions", "4096", "--max-prompt-tokens",
                           "1024", "--max-new-tokens", "512", "--default-max-new-tokens", "16", log=log_path)
    proc = server.proc
    try:
        target = server.target
        channel = grpc.insecure_channel(target, options=[("grpc.enable_retries", 0)])
        raw = Raw(grpc, channel, pb)
        client = Client(target, timeout=120, retries=0)

        solo = Canary(client, "canary-solo")
        solo.run()
        check(solo.error is None and len(solo.conversations) == 1 and len(solo.conversations[0]) == CANARY_TURNS,
              f"canary alone: {CANARY_TURNS} turns ({solo.error})")
        solo_turns = solo.conversations[0]
        client.complete("In the beginning", session="canary-src", max_new_tokens=8)  # for export
        rss0 = rss_mb(proc.pid)
        canary_stop = threading.Event()
        canary = Canary(Client(target, timeout=120, retries=0), "canary-live", canary_stop)
        canary.start()

        # Slow readers: streams that read one message and then nothing until the end.
        slow = []
        for i in range(4):
            it = raw.calls["Generate"](pb.GenerateRequest(
                session_id=f"fz-slow-{i}", create_session=True, text="slow",
                stopping=pb.StoppingCriteria(max_new_tokens=512, ignore_eos=True)).SerializeToString(), timeout=300)
            next(it)
            slow.append(it)

        # 1. Field-level bad values.
        long_id = "L" * 10000
        refused = 0
        for method, payload, codes, field in field_cases(pb, long_id):
            code, details, _ = raw.call(method, payload)
            check(code in codes and field in details and len(details) < 1024 and long_id[:200] not in details,
                  f"{method} bad {field}: {code} {details[:120]!r}")
            refused += code != "OK"
        # An import whose later message is not a message must not commit.
        code, _, resp = raw.call("ExportSession", pb.ExportSessionRequest(session_id="canary-src").SerializeToString())
        data = b"".join(pb.SnapshotChunk.FromString(r).data for r in resp)
        first = pb.ImportSessionRequest(session_id="fz-imp", data=data[:len(data) // 2]).SerializeToString()
        code, details, _ = raw.call("ImportSession", [first, b"\xff\xff\xff"])
        check(code == "INVALID_ARGUMENT", f"ImportSession with an unparsable later message: {code} {details[:100]!r}")
        code, _, _ = raw.call("GetSession", pb.GetSessionRequest(session_id="fz-imp").SerializeToString())
        check(code == "NOT_FOUND", f"... and nothing was imported ({code})")

        # 2. Random and mutated payloads for every method.
        counts = {}
        bad = []
        valid = valid_payloads(pb)
        n_random = 50 * args.scale
        for method in sorted(raw.kinds):
            client_stream = raw.kinds[method] in ("stream_unary", "stream_stream")
            for i in range(2 * n_random):
                if i < n_random:
                    p = bytes(rng.randrange(256) for _ in range(rng.randint(0, 48)))
                    payload = [p] if client_stream else p
                else:
                    base = valid[method]
                    payload = [mutate(rng, x) for x in base] if client_stream else mutate(rng, base)
                code, details, _ = raw.call(method, payload, max_messages=64)
                counts[code] = counts.get(code, 0) + 1
                if code in FORBIDDEN:
                    bad.append((method, code, details[:100], payload if len(repr(payload)) < 200 else "..."))
        check(not bad, f"random/mutated payloads: no {sorted(FORBIDDEN)} ({bad[:5]}); codes {counts}")

        # 3. Cancel storms.
        storm_errors = []

        def storm(i):
            try:
                it = raw.calls["Generate"](pb.GenerateRequest(
                    session_id=f"fz-storm-{i % 6}", create_session=True, text="storm",
                    stopping=pb.StoppingCriteria(max_new_tokens=64)).SerializeToString(), timeout=60)
                deadline = time.monotonic() + rng.uniform(0, 0.03)
                for _ in it:
                    if time.monotonic() > deadline:
                        break
                it.cancel()
                chat_it = raw.calls["Chat"](iter([pb.ChatRequest(turn=pb.GenerateRequest(
                    session_id=f"fz-cstorm-{i}", create_session=True, text="x",
                    stopping=pb.StoppingCriteria(max_new_tokens=64))).SerializeToString()]), timeout=60)
                for _ in chat_it:
                    break
                chat_it.cancel()
            except grpc.RpcError as e:
                if e.code().name in FORBIDDEN:
                    storm_errors.append(e.code().name)

        threads = [threading.Thread(target=storm, args=(i,)) for i in range(40 * args.scale)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        check(not storm_errors and not any(t.is_alive() for t in threads),
              f"cancel storm: {len(threads)} streams cancelled mid-turn ({storm_errors[:5]})")

        # 4. Disconnects: a child holding streams is killed.
        child = subprocess.Popen([sys.executable, "-c", f"""
import sys, time
sys.path.insert(0, {args.stubs!r})
import grpc
from retnet.v1 import retnet_pb2 as pb
ch = grpc.insecure_channel({target!r})
g = ch.unary_stream('/retnet.v1.RetNet/Generate')
its = [g(pb.GenerateRequest(session_id='fz-kill-%d' % i, create_session=True, text='bye',
        stopping=pb.StoppingCriteria(max_new_tokens=512, ignore_eos=True)).SerializeToString()) for i in range(4)]
for it in its:
    next(it)
print('ready', flush=True)
time.sleep(600)
"""], stdout=subprocess.PIPE)
        line = child.stdout.readline()
        check(line.strip() == b"ready", "disconnects: child holds 4 streams")
        child.kill()
        child.wait()

        check(canary.is_alive(), "canary: still talking when the campaign ends (it ran throughout)")
        canary_stop.set()
        canary.join(timeout=300)
        check(not canary.is_alive() and canary.error is None, f"canary finished ({canary.error})")
        turns = sum(len(c) for c in canary.conversations)
        check(all(c == solo_turns[:len(c)] for c in canary.conversations) and turns > 0,
              f"canary: all {turns} turns of {len(canary.conversations)} conversations equal the solo run's")
        for it in slow:
            it.cancel()

        check(proc.poll() is None, "server still running")
        code, _, resp = raw.call("ListSessions", pb.ListSessionsRequest().SerializeToString())
        health = channel.unary_unary("/grpc.health.v1.Health/Check")(b"", timeout=10)
        check(health == b"\x08\x01", "health: SERVING")
        generating = None
        for _ in range(200):  # bounded: up to 20 s for cancellations to reach the engine
            sessions = client.list_sessions()
            generating = [s.session_id for s in sessions if s.generating]
            if not generating:
                break
            time.sleep(0.1)
        check(not generating, f"no session left generating ({generating[:5] if generating else ''})")
        rss1 = rss_mb(proc.pid)
        check(rss1 - rss0 < MAX_RSS_GROWTH_MB, f"RSS growth {rss1 - rss0:.0f} MB < {MAX_RSS_GROWTH_MB} MB "
              f"({rss0:.0f} -> {rss1:.0f})")
    finally:
        rc = server.stop()
    check(rc == 0, f"server drained and exited 0 ({rc})")
    lines = open(log_path, "rb").read().splitlines()
    not_json = []
    rpc_lines = 0
    for ln in lines:
        try:
            obj = json.loads(ln.decode("utf-8"))
            if not isinstance(obj, dict) or "msg" not in obj:
                not_json.append(ln[:200])
            elif obj["msg"].startswith("rpc="):
                rpc_lines += 1
        except (UnicodeDecodeError, ValueError):
            not_json.append(ln[:200])
    check(not not_json, f"--json-logs: all {len(lines)} lines are JSON objects ({not_json[:3]})")
    check(rpc_lines >= refused, f"a log line per RPC: {rpc_lines} rpc= lines >= {refused} refusals")
    return finish()


if __name__ == "__main__":
    sys.exit(main())
