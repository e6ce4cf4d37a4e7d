"""Two retnet-server replicas behind a real nginx gateway, sharing sessions through a real
redis-server (--session-store), all on 127.0.0.1 with free ports.

usage: test_replicas.py --server BIN --client BIN --stubs build/python --template deploy/nginx/retnet.conf.template

The gateway is rendered from the same template the compose file and Kubernetes use. Checks:
- many sessions through the gateway each stay on one replica (read from the replicas' own
  session lists), turn after turn;
- a bounded multi-turn load through the gateway completes without errors;
- SIGTERM one replica while one of its sessions is generating: that generation completes, and
  every conversation it held continues on the other replica with exactly the tokens it would have
  produced (measured beforehand on forks made on the replica itself);
- sessions move back and forth between replicas by hand, each continuing from the latest turn;
- conversations through the gateway across a rolling restart of both replicas (each SIGTERMed
  and started again on its address): no errors beyond retried UNAVAILABLEs, and no lost turn
  (every conversation's position and next turn equal a replay of its acknowledged turns).
"""

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from harness import FAILURES, RedisServer, ServerProcess, check, free_port, openai_chat  # noqa: E402



def Replica(binary, tmp, name, store, listen="127.0.0.1:0", http_listen="127.0.0.1:0"):
    s = ServerProcess(binary, tmp, name, "--session-store", store, "--drain-grace-s", "60",
                      "--log-level", "info", log=os.path.join(tmp, name + ".log"), listen=listen,
                      http=True, http_listen=http_listen)
    s.http_target = f"127.0.0.1:{s.http_port}"
    return s


class Gateway:
    """nginx in the foreground with the project's template (gRPC on `port`, the OpenAI API on
    `http_port`, proxied to `http_upstreams`: unused addresses when None); retried on other ports
    if taken."""

    def __init__(self, nginx, template, tmp, upstreams, http_upstreams=None):
        self.prefix = os.path.join(tmp, "nginx")
        os.makedirs(os.path.join(self.prefix, "logs"), exist_ok=True)
        body = open(template).read()
        for attempt in range(5):
            self.port, self.http_port = free_port(), free_port()
            rendered = body.replace("${GATEWAY_LISTEN}", f"127.0.0.1:{self.port}")
            rendered = rendered.replace("${GATEWAY_HTTP_LISTEN}", f"127.0.0.1:{self.http_port}")
            for i, u in enumerate(upstreams):
                rendered = rendered.replace("${RETNET_REPLICA_%d_HTTP}" % i,
                                            http_upstreams[i] if http_upstreams else "127.0.0.1:9")
                rendered = rendered.replace("${RETNET_REPLICA_%d}" % i, u)
            check("${" not in rendered, "gateway template fully rendered") if attempt == 0 else None
            open(os.path.join(self.prefix, "retnet.conf"), "w").write(rendered)
            user = "user root;\n" if os.geteuid() == 0 else ""
            open(os.path.join(self.prefix, "nginx.conf"), "w").write(
                f"{user}worker_processes 1;\ndaemon off;\npid {self.prefix}/nginx.pid;\n"
                f"error_log {self.prefix}/logs/error.log info;\nevents {{ worker_connections 1024; }}\n"
                f"http {{\n  access_log {self.prefix}/logs/access.log;\n"
                f"  client_body_temp_path {self.prefix}/body;\n  proxy_temp_path {self.prefix}/proxy;\n"
                f"  fastcgi_temp_path {self.prefix}/fastcgi;\n  uwsgi_temp_path {self.prefix}/uwsgi;\n"
                f"  scgi_temp_path {self.prefix}/scgi;\n  include {self.prefix}/retnet.conf;\n}}\n")
            self.proc = subprocess.Popen([nginx, "-p", self.prefix, "-c", f"{self.prefix}/nginx.conf"],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            for _ in range(500):  # bounded: up to 5 s for nginx to listen
                if self.proc.poll() is not None:
                    break
                try:
                    for port in (self.port, self.http_port):
                        socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    self.target = f"127.0.0.1:{self.port}"
                    return
                except OSError:
                    time.sleep(0.01)
            err = self.proc.stderr.read().decode() if self.proc.poll() is not None else ""
            self.stop()
            if "Address already in use" not in err:
                raise RuntimeError(f"nginx did not start: {err}")
        raise RuntimeError("nginx: no free port after 5 attempts")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--server", required=True)
    ap.add_argument("--client", required=True)
    ap.add_argument("--stubs", required=True)
    ap.add_argument("--template", required=True)
    ap.add_argument("--nginx", default=shutil.which("nginx") or "/usr/sbin/nginx")
    args = ap.parse_args()
    sys.path[:0] = [args.stubs, os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../client/python")]
    import grpc
    from retnet_client import Client

    tmp = tempfile.mkdtemp(prefix="retnet-replicas-")
    redis = RedisServer(tmp)
    state = redis.url
    replicas = [Replica(args.server, tmp, f"replica{i}", state) for i in range(2)]
    gw = None
    try:
        gw = Gateway(args.nginx, args.template, tmp, [r.target for r in replicas],
                     [r.http_target for r in replicas])
        direct = [Client(r.target) for r in replicas]
        via = Client(gw.target)

        def holders(which=(0, 1)):
            """Each replica's own session list: id -> position."""
            return [{s.session_id: s.position for s in direct[i].list_sessions()} for i in which]

        def greedy(c, prompt, session, n):
            return c.complete(prompt, session=session, max_new_tokens=n, temperature=0, ignore_eos=True)

        # 1. Many sessions, two turns each, all through the gateway.
        ids = [f"conv-{i}" for i in range(24)]
        prompts = ["In the beginning", " and God said", ", and the"]
        outputs = {sid: [] for sid in ids}
        for turn in range(2):
            for sid in ids:
                r = greedy(via, prompts[turn], sid, 8)
                assert len(r.tokens) == 8, r
                outputs[sid].append(r.tokens)
            held = holders()
            on = [sum(sid in h for h in held) for sid in ids]
            check(all(n == 1 for n in on), f"turn {turn + 1}: every session is held by exactly one replica")
        where = {sid: (0 if sid in held[0] else 1) for sid in ids}
        check(0 < sum(where.values()) < len(ids), f"both replicas hold sessions ({sum(v == 0 for v in where.values())}"
              f" / {sum(where.values())})")
        check(all(held[where[s]][s] == 1 + 16 + 8 + 13 + 8 - 1 for s in ids),
              "each session's position on its replica counts both turns")

        # 2. A bounded multi-turn load through the gateway.
        bench = subprocess.run([args.client, "--target", gw.target, "bench", "-c", "4", "-n", "40", "--turns", "2",
                                "--prompt-tokens", "8:24", "--output-tokens", "8", "--json", "-"],
                               capture_output=True, text=True, timeout=300)
        rep = json.loads(bench.stdout) if bench.returncode == 0 else {}
        check(rep.get("requests", {}).get("completed") == 40 and rep.get("errors") == {},
              f"bench through the gateway: 40 requests, no errors ({rep.get('errors')})")

        # A fork through the gateway is made where its source lives; its own calls hash on the new
        # id. Try names until one lands on the other replica, which must find it there.
        src = ids[0]
        home = where[src]
        direct[home].fork_session(src, "probe-fork")
        want = greedy(direct[home], " Selah", "probe-fork", 10).tokens
        direct[home].delete_session("probe-fork")
        crossed = None
        for i in range(16):
            name = f"conv-fork-{i}"
            via.fork_session(src, name)
            got = greedy(via, " Selah", name, 10).tokens
            elsewhere = name in {s.session_id for s in direct[1 - home].list_sessions()}
            via.delete_session(name)
            if elsewhere:
                crossed = got
                break
        check(crossed is not None and crossed == want,
              "a fork made through the gateway continues exactly on the other replica")

        # 3. What the sessions of the busier replica will say next, measured on forks made on it.
        victim = 0 if sum(v == 0 for v in where.values()) >= len(ids) // 2 else 1
        survivor = 1 - victim
        moving = [s for s in ids if where[s] == victim]
        check(len(moving) >= 4, f"the replica to stop holds at least 4 conversations ({len(moving)})")
        expected = {}
        for sid in moving:
            direct[victim].fork_session(sid, "probe-" + sid)
            expected[sid] = greedy(direct[victim], prompts[2], "probe-" + sid, 12).tokens
            direct[victim].delete_session("probe-" + sid)

        # An OpenAI chat through the gateway's HTTP endpoint, held by the replica to stop.
        chat_sid, chat_next = None, None
        for i in range(32):  # bounded: names until one lands on that replica
            m1 = [{"role": "user", "content": f"Hello number {i}."}]
            status, t1 = openai_chat(gw.http_port, m1, f"chat-{i}")
            if status != 200:
                check(False, f"a chat turn through the gateway's HTTP endpoint ({status} {t1})")
                break
            if f"chat-{i}" in {x.session_id for x in direct[victim].list_sessions()}:
                chat_sid = f"chat-{i}"
                chat_next = m1 + [{"role": "assistant", "content": t1["choices"][0]["message"]["content"]},
                                  {"role": "user", "content": "And then?"}]
                break
        check(chat_sid is not None, "an OpenAI chat session through the gateway lands on the replica to stop")

        # 4. SIGTERM replica 0 while one of its sessions is generating (through the gateway).
        busy = moving[0]
        pieces = via.generate(" Amen", session=busy, max_new_tokens=200, temperature=0, ignore_eos=True)
        got = [next(pieces).id]
        replicas[victim].proc.send_signal(signal.SIGTERM)
        got += [p.id for p in pieces]
        check(len(got) == 200 and via.last_final is not None, "the generation running at SIGTERM completes")
        replicas[victim].proc.wait(timeout=90)
        check(replicas[victim].proc.returncode == 0, "the drained replica exits cleanly")

        # 5. Every conversation continues through the gateway; the moved ones on the survivor, exactly.
        cont = {sid: greedy(via, prompts[2], sid, 12).tokens for sid in ids if sid != busy}
        check(all(cont[s] == expected[s] for s in moving if s != busy),
              f"{len(moving) - 1} moved conversations continue with exactly the tokens they would have produced")
        check(all(len(t) == 12 for t in cont.values()), "every other conversation continues too")
        # The busy session: restored on first use; its drained turn is in the state.
        moved = via.session(busy)
        check(moved.position == held[victim][busy] + 1 + len(" Amen") + 199,
              "the session that was generating at SIGTERM kept that whole turn")
        # Its next turn equals one pass over its whole conversation (prompts and outputs as ids).
        convo = []
        for turn in range(2):
            convo += list(prompts[turn].encode()) + outputs[busy][turn]
        convo += list(" Amen".encode()) + got + list(prompts[2].encode())
        ref = greedy(direct[survivor], convo, "reference-busy", 12).tokens
        nxt = greedy(via, prompts[2], busy, 12).tokens
        check(nxt == ref, "and continues with exactly the tokens of one pass over its conversation")
        if chat_sid is not None:
            status, t2 = openai_chat(gw.http_port, chat_next, chat_sid)
            _, whole = openai_chat(gw.http_port, chat_next)
            check(status == 200 and t2["choices"][0]["message"] == whole["choices"][0]["message"] and
                  t2["usage"]["prompt_tokens"] < whole["usage"]["prompt_tokens"],
                  f"the OpenAI chat continues through the gateway on the other replica, as the whole "
                  f"conversation sent at once, prefilling only its new part ({status} {t2.get('error')})")
        after = holders([survivor])[0]
        check(all(s in after for s in ids), "the surviving replica now holds every session")
        check(chat_sid is None or chat_sid in after, "the chat session moved to the surviving replica")
        # Deleting a moved session removes its snapshot too: no replica can revive it.
        gone = moving[1]
        via.delete_session(gone)
        try:
            via.session(gone)
            revived = True
        except grpc.RpcError as e:
            revived = e.code() != grpc.StatusCode.NOT_FOUND
        snaps = [k for k in redis.client().scan_iter(match="*:snap", count=1000)
                 if k.decode().endswith(gone.encode().hex() + "}:snap")]
        check(not revived and not snaps, "a deleted session's snapshot is removed from the store")

        # 6. Hand-back: the drained replica comes back (same store) and sessions move
        #    between the two by hand. Each turn is saved before its end is sent (write-through),
        #    and a replica whose copy another replica has superseded replaces it.
        replicas[victim].stop()
        replicas[victim] = Replica(args.server, tmp, f"replica{victim}-restarted", state)
        back = Client(replicas[victim].target)
        s1 = moving[2]
        direct[survivor].fork_session(s1, "probe-s1")
        want = greedy(direct[survivor], " Selah", "probe-s1", 10).tokens
        direct[survivor].delete_session("probe-s1")
        check(greedy(back, " Selah", s1, 10).tokens == want,
              "a session moved back continues from the other replica's latest turn (write-through)")
        back.fork_session(s1, "probe-s1b")
        want = greedy(back, " Amen", "probe-s1b", 10).tokens
        back.delete_session("probe-s1b")
        check(greedy(direct[survivor], " Amen", s1, 10).tokens == want,
              "a replica holding a superseded copy replaces it with the newer one")
        s2 = moving[3]
        greedy(back, " and", s2, 4)  # now back holds s2 too, and so does the survivor
        back.delete_session(s2)
        try:
            direct[survivor].session(s2)
            dropped = False
        except grpc.RpcError as e:
            dropped = e.code() == grpc.StatusCode.NOT_FOUND
        check(dropped, "a session deleted on one replica is gone on the other too")

        # 7. A rolling restart of both replicas under load: conversations through the gateway
        #    while each replica in turn is SIGTERMed and started again on its address. The next
        #    one is restarted once the gateway sends sessions to the restarted one again (as a
        #    Deployment waits for readiness); in between, every session lives on one replica.
        gw.stop()
        gw = Gateway(args.nginx, args.template, tmp, [r.target for r in replicas])
        via.close()
        via = Client(gw.target)
        for c in direct:
            c.close()
        direct = [Client(r.target) for r in replicas]
        convs, sides = {}, [0, 0]
        for i in range(64):  # bounded: names until each replica holds 4 conversations
            if min(sides) >= 4:
                break
            sid = f"roll-{i}"
            res = greedy(via, " turn 0", sid, 8)
            side = 0 if sid in {x.session_id for x in direct[0].list_sessions()} else 1
            if sides[side] >= 4:
                via.delete_session(sid)
                continue
            sides[side] += 1
            convs[sid] = {"convo": list(b" turn 0") + res.tokens, "turns": 1, "errors": []}
        check(sides == [4, 4], f"4 conversations on each replica before the rolling restart ({sides})")
        stop = threading.Event()

        def talk(sid, rec):
            c = Client(gw.target, retries=4)
            try:
                for k in range(1, 1200):  # bounded (the replay's prompt stays under --max-prompt-tokens)
                    if stop.wait(0.005):  # paced: a steady load, not a spin
                        break
                    prompt = f" turn {k}"
                    try:
                        res = greedy(c, prompt, sid, 8)
                    except grpc.RpcError as e:
                        rec["errors"].append(f"{e.code()}: {e.details()}")
                        break
                    rec["convo"] += list(prompt.encode()) + res.tokens
                    rec["turns"] += 1
            finally:
                c.close()

        def turns():
            return sum(rec["turns"] for rec in convs.values())

        def wait_for(cond, limit_s=60):
            t_end = time.monotonic() + limit_s
            while time.monotonic() < t_end:  # bounded
                if cond():
                    return True
                time.sleep(0.01)
            return False

        talkers = [threading.Thread(target=talk, args=(sid, rec)) for sid, rec in convs.items()]
        for t in talkers:
            t.start()
        rolled = True
        try:
            n = turns()
            rolled &= wait_for(lambda: turns() >= n + 16)
            for idx in range(2):
                addr = replicas[idx].target
                replicas[idx].proc.send_signal(signal.SIGTERM)
                replicas[idx].proc.wait(timeout=90)
                rolled &= replicas[idx].proc.returncode == 0
                n = turns()
                rolled &= wait_for(lambda: turns() >= n + 8)  # the other replica serves them all
                replicas[idx] = Replica(args.server, tmp, f"replica{idx}-rolled", state, listen=addr)
                fresh = Client(replicas[idx].target)
                # back in the gateway: nginx retries a failed upstream after its fail_timeout (10 s)
                rolled &= wait_for(lambda: any(x.session_id.startswith("roll-") for x in fresh.list_sessions()))
                fresh.close()
                n = turns()
                rolled &= wait_for(lambda: turns() >= n + 16)
        finally:
            stop.set()
            for t in talkers:
                t.join(timeout=120)
        errors = [e for rec in convs.values() for e in rec["errors"]]
        check(rolled and not errors, f"{turns()} turns through the gateway across a rolling restart of both "
              f"replicas: no errors ({errors[:3]})")
        for c in direct:
            c.close()
        direct = [Client(r.target) for r in replicas]
        lost = []
        for sid, rec in convs.items():
            if via.session(sid).position != len(rec["convo"]):
                lost.append(f"{sid}: position")
            nxt = greedy(via, " Selah", sid, 8).tokens
            if nxt != greedy(direct[0], rec["convo"] + list(b" Selah"), "", 8).tokens:
                lost.append(f"{sid}: next turn")
        check(not lost, f"no lost turn: every conversation's position and next turn equal a replay of its "
              f"acknowledged turns ({lost[:4]})")
        for c in direct:
            c.close()
        back.close()
        via.close()
    finally:
        if gw is not None:
            gw.stop()
        for r in replicas:
            r.stop()
        redis.kill()
        if FAILURES or sys.exc_info()[0] is not None:
            if gw is not None:
                print("--- nginx error.log ---\n" + open(os.path.join(gw.prefix, "logs/error.log")).read()[-4000:])
            for r in replicas:
                text = open(os.path.join(tmp, r.name + ".log")).read()
                # Every call that did not end OK, and warnings, wherever they are in the log.
                odd = [line for line in text.splitlines()
                       if ("code=" in line and "code=OK" not in line) or "[warning]" in line or "[error]" in line]
                print(f"--- {r.name} log: calls not OK, warnings, errors ---\n" + "\n".join(odd[-60:]))
                print(f"--- {r.name} log (tail) ---\n" + text[-3000:])
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{len(FAILURES)} failure(s)" if FAILURES else "all checks passed")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
