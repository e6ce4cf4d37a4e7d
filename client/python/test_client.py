"""Runs the Python client against a live retnet-server (started here on 127.0.0.1 port 0).

usage: test_client.py --server build/bin/retnet-server --stubs build/python [--cxx-client build/bin/retnet-client]
Checks: greedy generation through the client equals the same request's token ids read with the raw
grpcio stub and with the C++ retnet-client, and continues a session across two calls exactly like one uninterrupted call would;
status codes surface as grpc.RpcError.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--server", required=True)
    ap.add_argument("--stubs", required=True)
    ap.add_argument("--cxx-client")
    args = ap.parse_args()
    sys.path.insert(0, args.stubs)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import grpc
    from retnet_client import Client
    from retnet.v1 import retnet_pb2 as pb
    from retnet.v1 import retnet_pb2_grpc as pb_grpc

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests"))
    from harness import ServerProcess, check, finish

    server = ServerProcess(args.server, tempfile.mkdtemp(), "server", "--log-level", "warn")
    try:
        target = server.target
        with Client(target) as c:
            info = c.model_info()
            check(info.vocab_size == 258, "model info: vocab 258")
            a = c.complete("In the beginning", session="py-a", max_new_tokens=30, temperature=0, ignore_eos=True)
            check(len(a.tokens) == 30 and a.final.usage.completion_tokens == 30, "30 tokens and usage")
            check(bytes(a.tokens).decode("utf-8", "replace") == a.text, "text is the bytes of the ids")
            # The raw stub, same request on a fresh session: the same ids.
            stub = pb_grpc.RetNetStub(grpc.insecure_channel(target))
            req = pb.GenerateRequest(session_id="py-raw", create_session=True, text="In the beginning")
            req.sampling.temperature = 0
            req.stopping.max_new_tokens = 30
            req.stopping.ignore_eos = True
            raw = [t.id for m in stub.Generate(req, timeout=60) if m.HasField("chunk") for t in m.chunk.tokens]
            check(raw == a.tokens, "client ids equal raw-stub ids")
            if args.cxx_client:
                out = subprocess.run([args.cxx_client, "--target", target, "generate", "In the beginning",
                                      "--session", "py-cxx", "--max-new-tokens", "30", "--temperature", "0",
                                      "--ignore-eos", "--json"], capture_output=True, text=True, timeout=120)
                cxx = json.loads(out.stdout) if out.returncode == 0 else {}
                check(cxx.get("tokens") == a.tokens, "client ids equal the C++ retnet-client's")
            # One session continued across two calls == one call over the joined conversation.
            first = c.complete("And God", session="py-b", max_new_tokens=10, temperature=0, ignore_eos=True)
            second = c.complete(" said", session="py-b", max_new_tokens=10, temperature=0, ignore_eos=True)
            # (the server puts BOS in front of a new session's first turn, ids or text alike)
            convo = list(b"And God") + first.tokens + list(b" said")
            whole = c.complete(convo, session="py-c", max_new_tokens=10, temperature=0, ignore_eos=True)
            check(second.tokens == whole.tokens, "a continued session equals one pass over the conversation")
            check(c.session("py-b").position == 1 + len(convo) + 10 - 1, "session position counts the conversation")
            # The library's defaults are the server's: unset fields (temperature 1.0 and
            # --default-max-new-tokens there), and a call without a session is one-shot.
            plain = c.request("x")
            check(not plain.sampling.HasField("temperature") and plain.stopping.max_new_tokens == 0
                  and plain.session_id == "" and not plain.create_session,
                  "defaults: temperature and max_new_tokens unset, no session")
            one = c.complete("In the beginning", max_new_tokens=3)
            check(len(one.tokens) == 3 and one.final.session_id == ""
                  and all(s.session_id in ("py-a", "py-raw", "py-cxx", "py-b", "py-c") for s in c.list_sessions()),
                  "a call without a session leaves none behind")
            try:
                c.complete("x", session="py-d", temperature=-1.0)
                check(False, "negative temperature refused")
            except grpc.RpcError as e:
                check(e.code() == grpc.StatusCode.INVALID_ARGUMENT and "temperature" in e.details(),
                      "negative temperature is INVALID_ARGUMENT naming the field")
        return finish()
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
