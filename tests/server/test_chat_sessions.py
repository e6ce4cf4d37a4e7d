"""OpenAI chat sessions (x-session-id) that live with the session, not with the serving process.

usage: test_chat_sessions.py --server BIN --stubs build/python [--redis /usr/bin/redis-server]

Checks, against real servers on 127.0.0.1 (the built-in model, greedy):
- Session.transcript over gRPC: a text turn's transcript is the prompt and the streamed reply,
  its digest the FNV-1a the proto documents (computed here); a prompt of token ids leaves it
  unknown; expect_transcript refuses a stale turn with ABORTED and runs a current one.
- Two replicas sharing a redis-server (--session-store): a chat begun on one replica continues
  on the other and back, each turn equal to the whole conversation sent at once and prefilling
  only its new part; messages that do not extend it, a conversation continued through gRPC in
  between, and token ids are refused with 400s that say so.
- One server with --state-dir: a chat session continues after a restart.
- Two chat requests on one session at the same moment: one answers, the other is refused (409 or
  400, never a continuation of the wrong text), and the conversation goes on from the answer.
"""

import argparse
import os
import shutil
import sys
import tempfile
import threading

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from harness import FAILURES, RedisServer, ServerProcess, check, finish, openai_chat  # noqa: E402


def fnv1a(data: bytes) -> int:
    h = 14695981039346656037
    for b in data:
        h = ((h ^ b) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return h


def reply(body):
    return body["choices"][0]["message"]["content"]


def error(body):
    return body.get("error", {}).get("message", "") if isinstance(body, dict) else ""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--server", required=True)
    ap.add_argument("--stubs", required=True)
    ap.add_argument("--redis", default=shutil.which("redis-server") or "/usr/bin/redis-server")
    args = ap.parse_args()
    sys.path[:0] = [args.stubs, os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../client/python")]
    import grpc
    from retnet_client import Client
    from retnet.v1 import retnet_pb2 as pb

    tmp = tempfile.mkdtemp(prefix="retnet-chat-")
    servers, redis = [], None

    def serve(name, *extra):
        s = ServerProcess(args.server, tmp, name, *extra, "--log-level", "warn",
                          log=os.path.join(tmp, name + ".log"), http=True)
        servers.append(s)
        return s

    def whole(server, messages, max_tokens=12):
        status, body = openai_chat(server.http_port, messages, max_tokens=max_tokens)
        assert status == 200, body
        return body

    try:
        # 1. The transcript over gRPC.
        one = serve("single")
        c = Client(one.target, retries=0, timeout=60)
        res = c.complete("Hello there.", session="g", max_new_tokens=9, temperature=0, ignore_eos=True)
        t = c.session("g").transcript
        want = ("Hello there." + res.text).encode()
        check(c.session("g").HasField("transcript") and t.length == len(want) and t.digest == fnv1a(want),
              f"gRPC: the transcript is the prompt and the streamed reply, as FNV-1a ({t.length} bytes)")
        check(res.final.transcript == t, "gRPC: Final.transcript is the session's afterwards")
        stale = pb.GenerateRequest(session_id="g", text=" more")
        stale.stopping.max_new_tokens = 2
        stale.expect_transcript.length = 0
        stale.expect_transcript.digest = fnv1a(b"")
        try:
            list(c._stub.Generate(stale, timeout=60))
            code = grpc.StatusCode.OK
        except grpc.RpcError as e:
            code, details = e.code(), e.details()
        check(code == grpc.StatusCode.ABORTED and "expect_transcript" in details,
              f"gRPC: a stale expect_transcript is ABORTED naming it ({code})")
        check(c.session("g").position == res.final.usage.session_tokens_total - 1,
              "gRPC: the refused turn changed nothing")
        current = pb.GenerateRequest(session_id="g", text=" more")
        current.stopping.max_new_tokens = 2
        current.expect_transcript.CopyFrom(t)
        finals = [m.final for m in c._stub.Generate(current, timeout=60) if m.HasField("final")]
        check(len(finals) == 1 and finals[0].transcript.length > t.length,
              "gRPC: the current expect_transcript runs and extends the transcript")
        c.complete([72, 105], session="g", max_new_tokens=2, temperature=0)
        check(not c.session("g").HasField("transcript"), "gRPC: a prompt of token ids leaves it unknown")
        c.close()

        # 2. Replicas sharing Redis: the chat moves between them.
        if not os.path.exists(args.redis):
            print("redis-server not installed: the replica part is skipped")
        else:
            redis = RedisServer(tmp, "redis", args.redis)
            a = serve("replica0", "--session-store", redis.url)
            b = serve("replica1", "--session-store", redis.url)
            sid = "moving-chat"
            m1 = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello there."}]
            status, t1 = openai_chat(a.http_port, m1, sid)
            check(status == 200, f"replicas: turn 1 on replica 0 ({status} {error(t1)})")
            m2 = m1 + [{"role": "assistant", "content": reply(t1)}, {"role": "user", "content": "And then?"}]
            status, t2 = openai_chat(b.http_port, m2, sid)
            check(status == 200, f"replicas: turn 2 on replica 1 continues the chat ({status} {error(t2)})")
            if status == 200:
                w2 = whole(b, m2)
                check(reply(t2) == reply(w2), "replicas: turn 2 equals the whole conversation sent at once")
                check(t2["usage"]["prompt_tokens"] < w2["usage"]["prompt_tokens"],
                      f"replicas: turn 2 prefills only its new part ({t2['usage']['prompt_tokens']} < "
                      f"{w2['usage']['prompt_tokens']} tokens)")
                m3 = m2 + [{"role": "assistant", "content": reply(t2)}, {"role": "user", "content": "Ok."}]
                status, t3 = openai_chat(a.http_port, m3, sid, stream=True)
                check(status == 200 and reply(t3) == reply(whole(a, m3)),
                      f"replicas: a streamed turn 3 back on replica 0 equals the whole conversation ({status})")
                status, body = openai_chat(b.http_port, m1 + [{"role": "assistant", "content": "Something else."},
                                             {"role": "user", "content": "Hm."}], sid)
                check(status == 400 and "do not extend" in error(body),
                      f"replicas: messages that do not extend it are a 400 ({status} {error(body)})")
                # A turn through gRPC in between: the chat's messages no longer describe the session.
                cb = Client(b.target, retries=0, timeout=60)
                cb.complete(" (an aside)", session=sid, max_new_tokens=3, temperature=0)
                m4 = m3 + [{"role": "assistant", "content": reply(t3)}, {"role": "user", "content": "Go on."}]
                status, body = openai_chat(a.http_port, m4, sid)
                check(status == 400 and "do not extend" in error(body),
                      f"replicas: after a gRPC turn in between the old messages are refused ({status})")
                cb.complete([33, 33], session=sid, max_new_tokens=2, temperature=0)
                status, body = openai_chat(b.http_port, m4, sid)
                check(status == 400 and "not text" in error(body),
                      f"replicas: after a prompt of token ids the chat says the session is not text ({status} "
                      f"{error(body)})")
                cb.close()

        # 3. A state directory: the chat survives a restart.
        state = os.path.join(tmp, "state")
        s = serve("durable0", "--state-dir", state, "--state-dir-write-through")
        m1 = [{"role": "user", "content": "Remember me."}]
        status, t1 = openai_chat(s.http_port, m1, "durable")
        check(status == 200, f"state dir: turn 1 ({status})")
        s.stop()
        s = serve("durable1", "--state-dir", state, "--state-dir-write-through")
        m2 = m1 + [{"role": "assistant", "content": reply(t1)}, {"role": "user", "content": "Still there?"}]
        status, t2 = openai_chat(s.http_port, m2, "durable")
        check(status == 200 and reply(t2) == reply(whole(s, m2)),
              f"state dir: after a restart the chat continues as the whole conversation would ({status} "
              f"{error(t2)})")

        # 4. Two requests on one session at once: one answers, the other never runs on the wrong text.
        m1 = [{"role": "user", "content": "Race."}]
        status, t1 = openai_chat(s.http_port, m1, "racing", max_tokens=4)
        m2 = m1 + [{"role": "assistant", "content": reply(t1)}, {"role": "user", "content": "Who wins?"}]
        results = [None, None]
        barrier = threading.Barrier(2)

        def run(k):
            barrier.wait(timeout=30)
            results[k] = openai_chat(s.http_port, m2, "racing", max_tokens=60)

        threads = [threading.Thread(target=run, args=(k,)) for k in (0, 1)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=180)
        codes = sorted(r[0] for r in results if r is not None)
        check(len(codes) == 2 and codes[0] == 200 and codes[1] in (400, 409),
              f"race: one request answers, the other is refused ({codes})")
        won = [r[1] for r in results if r is not None and r[0] == 200]
        if won:
            m3 = m2 + [{"role": "assistant", "content": reply(won[0])}, {"role": "user", "content": "Next."}]
            status, t3 = openai_chat(s.http_port, m3, "racing")
            check(status == 200 and reply(t3) == reply(whole(s, m3)),
                  f"race: the conversation goes on from the answer ({status})")
    finally:
        for s in servers:
            s.kill()
        if redis is not None:
            redis.kill()
        if FAILURES or sys.exc_info()[0] is not None:
            print(f"logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return finish()


if __name__ == "__main__":
    sys.exit(main())
