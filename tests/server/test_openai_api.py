"""The OpenAI-compatible HTTP API against live retnet-server processes (built-in model).

  1. The official openai npm client (tests/server/openai_client, pinned) runs its checks:
     completions and chat, streamed and not, usage, stop strings, seeds, n > 1 (one prefill,
     forks), sessions, logprobs, every 400/404 error.
  2. Raw SSE framing with `curl -N`: content type, `data: {...}` events separated by blank lines,
     `data: [DONE]` last.
  3. Auth: the same API keys as gRPC (401 without or with a wrong key, 200 with a right one).
  4. Capacity: 429 when the state pool cannot take the temporary sessions of an n > 1 request.
  5. A client that disconnects mid-stream cancels its generation (the engine goes idle long
     before max_tokens, and the generated-token counter stops).
  6. Metrics (GET /metrics on the API port too) count HTTP requests (retnet_http_requests_total) and their turns.
  7. Draining: /health and new requests answer 503 while a stream still finishes.

  test_openai_api.py --server build/bin/retnet-server --node-dir tests/server/openai_client
"""

import argparse
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import harness  # noqa: E402
from harness import check  # noqa: E402

MODEL = "retnet-default"


def post(port, path, body, headers=None, timeout=60):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.request("POST", path, body=json.dumps(body),
                 headers={"Content-Type": "application/json", **(headers or {})})
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, r.getheader("Content-Type", ""), data


def get(port, path, timeout=10):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.request("GET", path)
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, data


def metric(port, name, labels=""):
    status, text = get(port, "/metrics")
    return harness.metric_sum(text.decode(), name, labels)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--server", required=True)
    ap.add_argument("--node-dir", required=True)
    ap.add_argument("--client", help="retnet-client, for bench --api openai")
    ap.add_argument("--checkpoint", required=True, help="the built-in model's directory")
    args = ap.parse_args()
    node = shutil.which("node")
    if node is None or not os.path.isdir(os.path.join(args.node_dir, "node_modules", "openai")):
        print("SKIP: node or tests/server/openai_client/node_modules (npm ci) missing")
        return 77
    tmp = tempfile.mkdtemp(prefix="retnet-openai-")
    try:
        # 1. The openai client's checks.
        server = harness.ServerProcess(args.server, tmp, "main", "--log-level", "warn",
                                       "--drain-grace-s", "120", http=True)
        out = subprocess.run([node, os.path.join(args.node_dir, "test_openai.js"), server.base_url,
                              MODEL], capture_output=True, text=True, timeout=600)
        print(out.stdout, end="")
        if out.stderr:
            print(out.stderr, end="")
        check(out.returncode == 0, "the openai npm client's checks pass")
        # Every temporary session of n > 1 is gone; only the chat session the client kept stays.
        sessions = (metric(server.http_port, "retnet_sessions_resident") +
                    metric(server.http_port, "retnet_sessions_spilled"))
        check(sessions == 1, f"n > 1 and one-shot requests leave nothing behind ({sessions:.0f} "
              "sessions: the client's one chat session)")

        # 2. Raw SSE framing through curl -N.
        body = {"model": MODEL, "prompt": "Hello", "max_tokens": 8, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}}
        curl = subprocess.run(
            ["curl", "-sN", "-D", "-", "-H", "Content-Type: application/json", "-d",
             json.dumps(body), server.base_url + "/v1/completions"],
            capture_output=True, timeout=60)
        head, _, events = curl.stdout.decode().partition("\r\n\r\n")
        check("content-type: text/event-stream" in head.lower(), "SSE: text/event-stream")
        blocks = [b for b in events.split("\n\n") if b]
        check(all(b.startswith("data: ") and "\n" not in b for b in blocks),
              f"SSE: every event is one 'data: ' line followed by a blank line ({len(blocks)} events)")
        check(blocks and blocks[-1] == "data: [DONE]" and events.endswith("\n\n"),
              "SSE: 'data: [DONE]' ends the stream")
        parsed = [json.loads(b[6:]) for b in blocks[:-1]]
        check(parsed and all(p["object"] == "text_completion" for p in parsed) and
              parsed[-1]["usage"]["completion_tokens"] == 8,
              "SSE: JSON chunks, the usage last")

        # Bodies that are not requests.
        status, ctype, data = post(server.http_port, "/v1/completions", "not json")
        check(status == 400 and json.loads(data)["error"]["type"] == "invalid_request_error",
              "a body that is not a JSON object: 400 in OpenAI's error shape")
        conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=10)
        conn.request("POST", "/v1/completions", body="[" * 100000 + "]" * 100000,
                     headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        r.read()
        check(r.status == 400, "a deeply nested body: 400, no crash")
        conn.close()
        status, _, data = post(server.http_port, "/v1/chat/completions",
                               {"messages": [{"role": "user", "content": [{"type": 7}]}]})
        check(status == 400 and "messages[0].content[0]" in json.loads(data)["error"]["message"],
              "a content part whose type is not a string: 400 naming it")
        status, _, data = post(server.http_port, "/v1/completions", {"prompt": "x"},
                               {"x-session-id": "\xff\xfe"})
        check(status == 400 and "x-session-id" in json.loads(data)["error"]["message"],
              "an x-session-id that is not UTF-8: 400 naming it")
        status, data = get(server.http_port, "/v1/nothing")
        check(status == 404 and json.loads(data)["error"]["type"] == "not_found_error",
              "an unknown endpoint: 404 in OpenAI's error shape")
        status, _, data = post(server.http_port, "/v1/completions", {"prompt": "x" * (9 << 20)})
        check(status == 413 and "too large" in json.loads(data)["error"]["message"],
              "a body over 8 MiB: 413 in OpenAI's error shape")
        status, data = get(server.http_port, "/health")
        check(status == 200, "GET /health: 200")

        # The load generator against the HTTP front.
        if args.client:
            report = os.path.join(tmp, "bench.json")
            b = subprocess.run([args.client, "--target", server.target, "bench", "--api", "openai",
                                "--http-target", f"127.0.0.1:{server.http_port}", "-c", "2", "-n",
                                "4", "--prompt-tokens", "16", "--output-tokens", "24",
                                "--turns", "2", "--no-progress", "--json", report],
                               capture_output=True, text=True, timeout=300)
            rep = json.load(open(report)) if os.path.exists(report) else {}
            check(b.returncode == 0 and rep.get("requests", {}).get("completed") == 4 and
                  rep.get("output_tokens") == 4 * 24 and not rep.get("errors"),
                  f"bench --api openai: 4 two-turn requests, 96 tokens "
                  f"({rep.get('requests')}, {rep.get('output_tokens')}, {b.stderr[-300:]})")

        # 5. A client that goes away mid-stream cancels its generation.
        mport = server.http_port  # /metrics is served on the API port too (as vLLM does)
        before = metric(mport, "retnet_generation_tokens_total")
        sock = socket.create_connection(("127.0.0.1", server.http_port), timeout=30)
        req = json.dumps({"model": MODEL, "prompt": "Tell me a long story", "max_tokens": 4000,
                          "temperature": 0, "ignore_eos": True, "stream": True})
        sock.sendall((f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                      f"\r\nContent-Length: {len(req)}\r\n\r\n{req}").encode())
        got = b""
        while got.count(b"data: ") < 5:  # bounded by the socket timeout
            piece = sock.recv(65536)
            if not piece:
                break
            got += piece
        check(got.count(b"data: ") >= 5, "disconnect: the stream started")
        sock.close()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and metric(mport, "retnet_num_requests_running") > 0:
            time.sleep(0.01)
        running = metric(mport, "retnet_num_requests_running")
        produced = metric(mport, "retnet_generation_tokens_total") - before
        check(running == 0 and produced < 4000,
              f"disconnect: the generation was cancelled ({produced:.0f} of 4000 tokens)")

        # 6. Metrics.
        ok_http = metric(mport, "retnet_http_requests_total",
                         'endpoint="/v1/completions",status="200"')
        bad_http = metric(mport, "retnet_http_requests_total",
                          'endpoint="/v1/completions",status="400"')
        chat_http = metric(mport, "retnet_http_requests_total",
                           'endpoint="/v1/chat/completions",status="200"')
        check(ok_http >= 10 and bad_http >= 5 and chat_http >= 3,
              f"metrics: HTTP requests counted by endpoint and status ({ok_http:.0f} ok, "
              f"{bad_http:.0f} bad completions, {chat_http:.0f} chats)")
        check(metric(mport, "retnet_requests_total", 'code="OK"') >= ok_http,
              "metrics: their turns are counted with the gRPC ones")

        # 7. Draining: a running stream finishes, new requests and /health get 503.
        sock = socket.create_connection(("127.0.0.1", server.http_port), timeout=60)
        req = json.dumps({"model": MODEL, "prompt": "Drain", "max_tokens": 3000, "temperature": 0,
                          "ignore_eos": True, "stream": True})
        sock.sendall((f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                      f"\r\nContent-Length: {len(req)}\r\n\r\n{req}").encode())
        got = b""
        while got.count(b"data: ") < 2:
            piece = sock.recv(65536)
            if not piece:
                break
            got += piece
        server.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        health = 200
        while time.monotonic() < deadline:
            try:
                health, _ = get(server.http_port, "/health")
            except OSError:
                break
            if health == 503:
                break
            time.sleep(0.01)
        check(health == 503, "drain: /health answers 503")
        try:
            status, _, data = post(server.http_port, "/v1/completions",
                                   {"model": MODEL, "prompt": "x", "max_tokens": 2})
        except OSError:
            status = -1
        check(status == 503, f"drain: a new request gets 503 (got {status})")
        while not got.endswith(b"data: [DONE]\r\n\r\n") and b"data: [DONE]" not in got[-64:]:
            piece = sock.recv(65536)  # bounded by the socket timeout
            if not piece:
                break
            got += piece
        check(b"data: [DONE]" in got, "drain: the running stream finished within the grace")
        sock.close()
        check(server.stop() == 0, "drain: the server exits 0")

        # Chat templates: the checkpoint's (tokenizer_config.json), raise_exception, a file.
        ckpt = os.path.join(tmp, "ckpt")
        shutil.copytree(args.checkpoint, ckpt)
        template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                    "{{ raise_exception('no system role here') }}{% endif %}"
                    "[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
                    "{% if add_generation_prompt %}[assistant]{% endif %}")
        with open(os.path.join(ckpt, "tokenizer_config.json"), "w") as f:
            json.dump({"chat_template": template, "eos_token": {"content": "</s>"}}, f)
        tpl = harness.ServerProcess(args.server, tmp, "tpl", "--log-level", "warn",
                                    "--checkpoint", ckpt, http=True)
        status, _, data = post(tpl.http_port, "/v1/chat/completions",
                               {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
        rendered = "[user]hi[assistant]"
        check(status == 200 and json.loads(data)["usage"]["prompt_tokens"] == len(rendered),
              f"chat template from tokenizer_config.json: the prompt is '{rendered}' "
              f"({status} {data[:200]})")
        check(json.loads(get(tpl.http_port, "/v1/models")[1])["data"][0]["id"] == "ckpt",
              "the served model name defaults to the checkpoint directory's name")
        status, _, data = post(tpl.http_port, "/v1/chat/completions",
                               {"messages": [{"role": "system", "content": "x"}], "max_tokens": 1})
        check(status == 400 and "no system role here" in json.loads(data)["error"]["message"],
              "the template's raise_exception is a 400 with its message")
        tpl.stop()
        tfile = os.path.join(tmp, "template.jinja")
        with open(tfile, "w") as f:
            f.write("X{% for m in messages %}{{ m['content'] }}{% endfor %}")
        tpl = harness.ServerProcess(args.server, tmp, "tplfile", "--log-level", "warn",
                                    "--checkpoint", ckpt, "--chat-template", tfile,
                                    "--served-model-name", "my-model", http=True)
        status, _, data = post(tpl.http_port, "/v1/chat/completions",
                               {"model": "my-model", "messages": [{"role": "user", "content": "hey"}],
                                "max_tokens": 1})
        check(status == 200 and json.loads(data)["usage"]["prompt_tokens"] == 4,
              "--chat-template FILE replaces the checkpoint's; --served-model-name")
        tpl.stop()

        # 3. Auth.
        keys = os.path.join(tmp, "keys")
        with open(keys, "w") as f:
            f.write("secret-key-1\n")
        auth = harness.ServerProcess(args.server, tmp, "auth", "--log-level", "warn",
                                     "--api-keys-file", keys, http=True)
        small = {"model": MODEL, "prompt": "Hi", "max_tokens": 2}
        check(post(auth.http_port, "/v1/completions", small)[0] == 401, "auth: no key -> 401")
        status, _, data = post(auth.http_port, "/v1/completions", small,
                               {"Authorization": "Bearer wrong"})
        check(status == 401 and json.loads(data)["error"]["type"] == "authentication_error",
              "auth: a wrong key -> 401 authentication_error")
        check(post(auth.http_port, "/v1/completions", small,
                   {"Authorization": "Bearer secret-key-1"})[0] == 200, "auth: the key -> 200")
        conn = http.client.HTTPConnection("127.0.0.1", auth.http_port, timeout=10)
        conn.request("GET", "/v1/models")
        check(conn.getresponse().status == 401, "auth: GET /v1/models needs the key too")
        conn.close()
        auth.stop()

        # 4. Capacity: one device slot, no host spill; a chat session holds it.
        full = harness.ServerProcess(args.server, tmp, "full", "--log-level", "warn",
                                     "--max-sessions", "1", "--max-host-sessions", "0", http=True)
        status, _, _ = post(full.http_port, "/v1/chat/completions",
                            {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                             "max_tokens": 2}, {"x-session-id": "holder"})
        check(status == 200, "capacity: a session takes the only slot")
        status, _, data = post(full.http_port, "/v1/completions",
                               {"model": MODEL, "prompt": "x", "max_tokens": 2, "n": 2})
        err = json.loads(data).get("error", {})
        check(status == 429 and err.get("type") == "rate_limit_error",
              f"capacity: n=2 needs sessions the pool cannot hold -> 429 ({status} {err})")
        left = (metric(full.http_port, "retnet_sessions_resident") +
                metric(full.http_port, "retnet_sessions_spilled"))
        check(left == 1, f"capacity: the refused request left no session behind ({left:.0f})")
        full.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return harness.finish()


if __name__ == "__main__":
    sys.exit(main())
