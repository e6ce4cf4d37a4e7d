"""Strict-parsing clients and text that is not UTF-8.

usage: test_strict_clients.py --server build/bin/retnet-server --client build/bin/retnet-client
                              --stubs build/python [--node node]

1. Against a live retnet-server (built-in byte-level model): every byte token 0-255, forced with a
   logit bias, goes through Generate, Chat and Detokenize in the C++ client (retnet-client), the
   Python client (grpcio, whose protobuf rejects a proto3 string that is not UTF-8) and the Node
   client. None may fail, every text field must be the U+FFFD-sanitized form of the bytes, and the
   exact bytes must come back through Token.token_bytes / DetokenizeResponse.raw.
2. Against a rogue server (grpcio, in this process) whose Generate, Chat and Detokenize answer with
   a text field holding the byte 0xFF: the C++ and Python clients must report an error at once and
   cancel the stream (the rogue server waits up to ROGUE_WAIT_S for the cancellation, then ends
   the call normally), never wait for their deadline.
"""

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from harness import ServerProcess, check, finish  # noqa: E402

ROGUE_WAIT_S = 5.0  # a client that does not cancel by then is too slow ("at once" fails)
EXIT_INTERNAL = 64 + 13


def sanitized(data: bytes) -> str:
    # Python's "replace" substitutes U+FFFD per maximal ill-formed subpart, as the server does.
    return data.decode("utf-8", "replace")


class Rogue:
    """retnet.v1.RetNet answering Generate/Chat with a chunk whose Token.text is b"\\xff", and
    Detokenize with DetokenizeResponse.text b"\\xff" (GetModelInfo is valid)."""

    def __init__(self, grpc, pb):
        self.grpc, self.pb = grpc, pb
        self.events = []  # (method, "cancelled" | "ignored", seconds after the bad message)
        self.lock = threading.Lock()
        bad_token = pb.Token(id=255, text="X").SerializeToString()
        self.bad_chunk = pb.GenerateResponse(
            chunk=pb.TokenChunk(tokens=[pb.Token(id=255, text="X")])).SerializeToString().replace(
                bad_token, bad_token.replace(b"\x12\x01X", b"\x12\x01\xff"))
        self.final = pb.GenerateResponse(final=pb.Final(text="")).SerializeToString()
        self.bad_detok = pb.DetokenizeResponse(text="X", raw=b"\xff").SerializeToString().replace(
            b"\x0a\x01X", b"\x0a\x01\xff")
        assert b"\xff" in self.bad_chunk and b"X" not in self.bad_chunk
        handlers = {
            "Generate": grpc.unary_stream_rpc_method_handler(self._generate),
            "Chat": grpc.stream_stream_rpc_method_handler(self._chat),
            "Detokenize": grpc.unary_unary_rpc_method_handler(lambda req, ctx: self.bad_detok),
            # Valid, for bench's start-up call.
            "GetModelInfo": grpc.unary_unary_rpc_method_handler(
                lambda req, ctx: pb.ModelInfo(vocab_size=258, bos_token_id=256, eos_token_id=257,
                                              max_prompt_tokens=4096, max_new_tokens=4096).SerializeToString()),
        }
        self.server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=8))
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("retnet.v1.RetNet", handlers),))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        self.target = f"127.0.0.1:{self.port}"

    def _stream_bad(self, method, ctx):
        # The event is recorded when the call terminates (gRPC may never resume this generator
        # once the client has cancelled): "cancelled" unless the call ran to its Final.
        cancelled = threading.Event()
        state = {"t": time.monotonic(), "final": False}

        def done():
            cancelled.set()
            with self.lock:
                self.events.append((method, "ignored" if state["final"] else "cancelled",
                                    time.monotonic() - state["t"]))

        ctx.add_callback(done)
        yield self.bad_chunk
        if not cancelled.wait(ROGUE_WAIT_S):
            state["final"] = True
            yield self.final

    def _generate(self, request, ctx):
        yield from self._stream_bad("Generate", ctx)

    def _chat(self, requests, ctx):
        next(requests)  # the first turn
        yield from self._stream_bad("Chat", ctx)

    def take_events(self):
        with self.lock:
            ev, self.events = self.events, []
        return ev

    def stop(self):
        self.server.stop(0)


def run(cmd, stdin=None, timeout=60):
    t0 = time.monotonic()
    p = subprocess.run(cmd, input=stdin, capture_output=True, timeout=timeout)
    return p, time.monotonic() - t0


def wait_event(rogue, method):
    # The rogue handler records its event after the cancellation (or ROGUE_WAIT_S).
    deadline = time.monotonic() + ROGUE_WAIT_S + 5
    while time.monotonic() < deadline:
        for ev in rogue.take_events():
            if ev[0] == method:
                return ev
        time.sleep(0.01)
    return None


def check_real_cxx(cli, target):
    base = [cli, "--target", target, "--timeout", "60", "--retries", "0"]
    ok_all, texts = True, True
    for b in range(256):
        p, _ = run(base + ["generate", "--session", "cxx-strict", "--tokens", "65", "--temperature",
                           "0", "--max-new-tokens", "1", "--ignore-eos", "--logit-bias", f"{b}:100",
                           "--json", "--raw"])
        if p.returncode != 0:
            check(False, f"C++ generate forced byte {b}: exit {p.returncode} {p.stderr[-300:]!r}")
            ok_all = False
            break
        j = json.loads(p.stdout)
        if j["tokens"] != [b] or j["token_bytes_hex"] != [bytes([b]).hex()]:
            check(False, f"C++ generate forced byte {b}: got {j['tokens']} {j['token_bytes_hex']}")
            ok_all = False
            break
        if b < 128 and j["text"] != chr(b):
            texts = False
    check(ok_all, "C++ generate: every byte token 0-255 streamed, exact bytes in token_bytes")
    check(texts, "C++ generate: ASCII byte tokens come back as their character")
    p, _ = run(base + ["generate", "--tokens", "65", "--temperature", "0", "--max-new-tokens", "1",
                       "--ignore-eos", "--logit-bias", "255:100"])
    check(p.returncode == 0 and p.stdout == "\ufffd\n".encode(),
          f"C++ generate text mode: byte 0xFF prints U+FFFD ({p.stdout!r})")
    # Chat: the REPL from a pipe, every turn forced to an ill-formed or incomplete byte.
    lines = b"".join(b"x\n" for _ in range(4))
    outs = []
    for b in (0x80, 0xC3, 0xE2, 0xF0, 0xFF):
        p, _ = run(base + ["chat", "--temperature", "0", "--max-new-tokens", "2", "--ignore-eos",
                           "--logit-bias", f"{b}:100"], stdin=lines)
        outs.append((b, p.returncode, p.stdout.decode("utf-8", "strict") if p.returncode == 0 else p.stderr))
    check(all(rc == 0 for _, rc, _ in outs), f"C++ chat: byte-forced turns end OK {[(b, rc) for b, rc, _ in outs]}")
    check(all("\ufffd" in out for _, rc, out in outs if rc == 0),
          "C++ chat: the output is valid UTF-8 with U+FFFD for the lone bytes")
    p, _ = run(base + ["detokenize", "--raw"] + [str(i) for i in range(256)])
    check(p.returncode == 0 and p.stdout == bytes(range(256)), "C++ detokenize --raw: the exact bytes 0-255")
    p, _ = run(base + ["detokenize"] + [str(i) for i in range(256)])
    check(p.returncode == 0 and p.stdout.decode("utf-8") == sanitized(bytes(range(256))) + "\n",
          "C++ detokenize: bytes 0-255 as U+FFFD-sanitized text")


def check_real_python(Client, target):
    with Client(target, timeout=60, retries=0) as c:
        ok, text_ok = True, True
        for b in range(256):
            pieces = list(c.generate([65], session="py-strict-gen", max_new_tokens=1, ignore_eos=True,
                                     logit_bias={b: 100}, token_bytes=True))
            if [p.id for p in pieces] != [b] or pieces[0].token_bytes != bytes([b]):
                ok = False
                check(False, f"Python generate forced byte {b}: {[(p.id, p.token_bytes) for p in pieces]}")
                break
            if b < 128 and pieces[0].text + c.last_final.text != chr(b):
                text_ok = False
        check(ok, "Python generate: every byte token 0-255 parsed, exact bytes in token_bytes")
        check(text_ok, "Python generate: ASCII byte tokens come back as their character")
        turns = [c.request([65], session="py-strict-chat", max_new_tokens=1, ignore_eos=True,
                           logit_bias={b: 100}, token_bytes=True) for b in range(256)]
        got = [(pieces[0].id, pieces[0].token_bytes) for pieces in c.chat(turns, session="py-strict-chat")]
        check(got == [(b, bytes([b])) for b in range(256)],
              "Python chat: 256 byte-forced turns on one stream, all parsed, exact bytes")
        good = all(c.detokenize([b]) == (sanitized(bytes([b])), bytes([b])) for b in range(256))
        check(good, "Python detokenize: each byte 0-255 as sanitized text plus raw bytes")
        check(c.detokenize(range(256)) == (sanitized(bytes(range(256))), bytes(range(256))),
              "Python detokenize: all 256 bytes at once")
        # Each turn's text stands alone: a character split over two turns (0xC3 | 0xB6) ends the
        # first turn as U+FFFD and starts the second with one; the bytes stay exact.
        split = []
        for b in (0xC3, 0xB6):
            pieces = list(c.generate([65] if b == 0xC3 else [66], session="py-strict-split", max_new_tokens=1,
                                     ignore_eos=True, logit_bias={b: 100}, token_bytes=True))
            split.append(("".join(p.text for p in pieces) + c.last_final.text, pieces[0].token_bytes))
        check(split == [("\ufffd", b"\xc3"), ("\ufffd", b"\xb6")],
              f"Python generate: a character split over two turns is U+FFFD in each, bytes exact ({split})")


def check_real_node(node, target):
    if not node:
        print("skip Node: node not found")
        return
    p = subprocess.run([node, os.path.join(os.path.dirname(os.path.abspath(__file__)), "strict_node.js"),
                        "real", target], capture_output=True, timeout=240)
    if p.returncode == 77:
        print("skip Node: " + p.stderr.decode(errors="replace").strip())
        return
    if not check(p.returncode == 0, f"Node strict run exits 0 ({p.stderr[-400:]!r})"):
        return
    r = json.loads(p.stdout)
    check([t["ids"] for t in r["generate"]] == [[b] for b in range(256)] and
          [t["bytes_hex"] for t in r["generate"]] == [bytes([b]).hex() for b in range(256)],
          "Node generate: every byte token 0-255, exact bytes in tokenBytes")
    check([t["ids"] for t in r["chat"]] == [[b] for b in range(256)] and
          [t["bytes_hex"] for t in r["chat"]] == [bytes([b]).hex() for b in range(256)],
          "Node chat: 256 byte-forced turns on one stream")
    check([d["raw_hex"] for d in r["detokenize"]] == [bytes([b]).hex() for b in range(256)] and
          [d["text"] for d in r["detokenize"]] == [sanitized(bytes([b])) for b in range(256)],
          "Node detokenize: each byte as sanitized text plus raw bytes")
    check(r["detokenize_all"]["raw_hex"] == bytes(range(256)).hex() and
          r["detokenize_all"]["text"] == sanitized(bytes(range(256))), "Node detokenize: all 256 at once")


def check_rogue(rogue, cli, Client, grpc, node):
    base = [cli, "--target", rogue.target, "--timeout", "60", "--retries", "0"]
    p, secs = run(base + ["generate", "hi"])
    ev = wait_event(rogue, "Generate")
    check(p.returncode == EXIT_INTERNAL and b"not a valid retnet.v1.GenerateResponse" in p.stderr,
          f"C++ generate: an unparsable message is INTERNAL naming the type (exit {p.returncode}, {p.stderr[-200:]!r})")
    check(ev is not None and ev[1] == "cancelled" and secs < ROGUE_WAIT_S,
          f"C++ generate: cancelled the stream at once ({ev}, {secs:.2f} s)")
    p, secs = run(base + ["chat"], stdin=b"hi\n")
    ev = wait_event(rogue, "Chat")
    check(p.returncode == EXIT_INTERNAL and b"not a valid retnet.v1.GenerateResponse" in p.stderr,
          f"C++ chat: unparsable message reported (exit {p.returncode}, {p.stderr[-200:]!r})")
    check(ev is not None and ev[1] == "cancelled", f"C++ chat: cancelled the stream at once ({ev})")
    p, secs = run(base + ["detokenize", "1"])
    check(p.returncode == EXIT_INTERNAL and b"DetokenizeResponse" in p.stderr,
          f"C++ detokenize: INTERNAL naming the message (exit {p.returncode}, {p.stderr[-200:]!r})")
    tmp = tempfile.mkdtemp()
    report = os.path.join(tmp, "bench.json")
    p, secs = run(base + ["bench", "-n", "3", "-c", "1", "--prompt-tokens", "4", "--output-tokens", "8",
                          "--json", report], timeout=60)
    ok = os.path.exists(report)
    rep = json.load(open(report)) if ok else {}
    check(ok and secs < 3 * ROGUE_WAIT_S and "INTERNAL" in json.dumps(rep.get("errors", rep)),
          f"C++ bench: finishes at once and counts the unparsable streams as INTERNAL ({secs:.1f} s, "
          f"exit {p.returncode}, {str(rep.get('errors'))[:200]})")
    rogue.take_events()

    with Client(rogue.target, timeout=60, retries=0) as c:
        t0 = time.monotonic()
        try:
            list(c.generate("hi"))
            code = None
        except grpc.RpcError as e:
            code = e.code()
        secs = time.monotonic() - t0
        ev = wait_event(rogue, "Generate")
        check(code == grpc.StatusCode.INTERNAL and secs < ROGUE_WAIT_S,
              f"Python generate: INTERNAL at once ({code}, {secs:.2f} s)")
        check(ev is not None and ev[1] == "cancelled", f"Python generate: the stream was cancelled ({ev})")
        try:
            list(c.chat([c.request("hi")]))
            code = None
        except grpc.RpcError as e:
            code = e.code()
        ev = wait_event(rogue, "Chat")
        check(code == grpc.StatusCode.INTERNAL and ev is not None and ev[1] == "cancelled",
              f"Python chat: INTERNAL, stream cancelled ({code}, {ev})")
        try:
            c.detokenize([1])
            code = None
        except grpc.RpcError as e:
            code = e.code()
        check(code == grpc.StatusCode.INTERNAL, f"Python detokenize: INTERNAL ({code})")

    if node:
        p = subprocess.run([node, os.path.join(os.path.dirname(os.path.abspath(__file__)), "strict_node.js"),
                            "rogue", rogue.target], capture_output=True, timeout=60)
        if p.returncode != 77 and check(p.returncode == 0, f"Node rogue run exits 0 ({p.stderr[-300:]!r})"):
            r = json.loads(p.stdout)
            # protobufjs decodes an ill-formed string leniently (U+FFFD): no error, and no hang.
            g, d = r["generate"], r["detokenize"]
            check((g["ok"] and g["text"] == "\ufffd") or (not g["ok"] and g["code"] == 13),
                  f"Node generate: the bad text is either U+FFFD or INTERNAL ({g})")
            check(g["seconds"] < ROGUE_WAIT_S + 5, f"Node generate: bounded ({g['seconds']:.1f} s)")
            check((d["ok"] and d["text"] == "\ufffd") or (not d["ok"] and d["code"] == 13),
                  f"Node detokenize: U+FFFD or INTERNAL ({d})")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--server", required=True)
    ap.add_argument("--client", required=True)
    ap.add_argument("--stubs", required=True)
    ap.add_argument("--node")
    args = ap.parse_args()
    sys.path.insert(0, args.stubs)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "client", "python"))
    import grpc
    from retnet_client import Client
    from retnet.v1 import retnet_pb2 as pb

    server = ServerProcess(args.server, tempfile.mkdtemp(), "server", "--log-level", "warn")
    target = server.target
    rogue = Rogue(grpc, pb)
    try:
        check_real_cxx(args.client, target)
        check_real_python(Client, target)
        check_real_node(args.node, target)
        check_rogue(rogue, args.client, Client, grpc, args.node)
    finally:
        rogue.stop()
        server.stop()
    return finish()


if __name__ == "__main__":
    sys.exit(main())
