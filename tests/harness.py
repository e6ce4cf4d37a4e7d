"""What the Python tests share: check() with a failure list, and live retnet-server processes.

    sys.path.insert(0, "<repo>/tests"); import harness
    server = harness.ServerProcess("build/bin/retnet-server", tmp, "a", "--max-sessions", "4")
    harness.check(..., "what must hold")
    server.stop()
    sys.exit(harness.finish())

Servers listen on 127.0.0.1 port 0 and report the bound port through --port-file; the wait for
it is bounded (the model loads first).
"""

import http.client
import json
import os
import signal
import subprocess
import time

FAILURES = []


def check(cond, what):
    """Prints ok/FAIL for `what`; a failure is remembered for finish(). Returns `cond`."""
    print(("ok   " if cond else "FAIL ") + what, flush=True)
    if not cond:
        FAILURES.append(what)
    return cond


def finish() -> int:
    """The exit status: 0 when every check passed."""
    print(f"{len(FAILURES)} failures" if FAILURES else "all passed", flush=True)
    return 1 if FAILURES else 0


class ServerProcess:
    """One retnet-server on `listen` (default 127.0.0.1:0; a port it had, to restart a replica
    behind a gateway in place) (metrics off; the OpenAI HTTP API off unless `http`, then
    on `http_listen`, default 127.0.0.1:0, with its port in `http_port`). `log`: a file path for its stdout and stderr
    (default: inherited); `preexec_fn`: run in the child before exec (resource limits)."""

    def __init__(self, binary, tmp, name="server", *extra, log=None, preexec_fn=None,
                 load_timeout_s=30.0, http=False, listen="127.0.0.1:0", http_listen="127.0.0.1:0"):
        self.name = name
        self.port_file = os.path.join(tmp, name + ".port")
        self.http_port_file = os.path.join(tmp, name + ".http-port")
        for f in (self.port_file, self.http_port_file):
            if os.path.exists(f):
                os.unlink(f)
        http_args = (["--http-listen", http_listen, "--http-port-file", self.http_port_file]
                     if http else ["--http-listen", ""])
        self.log_path = log
        self._log = open(log, "ab") if log else None
        self.proc = subprocess.Popen(
            [binary, "--listen", listen, "--metrics-listen", "", "--port-file", self.port_file,
             *http_args, *extra], stdout=self._log, stderr=subprocess.STDOUT if self._log else None,
            preexec_fn=preexec_fn)
        deadline = time.monotonic() + load_timeout_s
        while True:  # bounded by the deadline
            wait_for = [self.port_file] + ([self.http_port_file] if http else [])
            if all(os.path.exists(f) and open(f).read().strip() for f in wait_for):
                break
            if self.proc.poll() is not None:
                raise RuntimeError(f"retnet-server {name} exited early ({self.proc.returncode})")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"retnet-server {name} did not listen within {load_timeout_s} s")
            time.sleep(0.01)
        self.port = int(open(self.port_file).read())
        self.target = f"127.0.0.1:{self.port}"
        self.http_port = int(open(self.http_port_file).read()) if http else 0
        self.base_url = f"http://127.0.0.1:{self.http_port}" if http else ""

    @property
    def pid(self):
        return self.proc.pid

    def stop(self, timeout=90):
        """SIGTERM (the drain), then SIGKILL after `timeout`; the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._close_log()
        return self.proc.returncode

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._close_log()
        return self.proc.returncode

    def _close_log(self):
        if self._log:
            self._log.close()
            self._log = None


class RedisServer:
    """Debian's redis-server on 127.0.0.1, its data in `dir` with AOF (appendfsync always, no RDB):
    what the deploy files run. The port is a free one (redis cannot report a port 0 it bound), retried
    when taken; restart() brings it back on the same port and data. `client()` is a redis-py client."""

    def __init__(self, tmp, name="redis", binary="/usr/bin/redis-server", *extra):
        self.dir = os.path.join(tmp, name)
        os.makedirs(self.dir, exist_ok=True)
        self.binary, self.extra, self.name = binary, list(extra), name
        self.log = os.path.join(tmp, name + ".log")
        self.port = 0
        for _ in range(5):
            self.port = free_port()
            if self._start():
                break
        else:
            raise RuntimeError("redis-server: no free port after 5 attempts")
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def _start(self, timeout_s=10.0):
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir,
             "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--daemonize", "no",
             "--logfile", self.log, "--maxmemory-policy", "noeviction", *self.extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        import socket
        while time.monotonic() < deadline:  # bounded
            if self.proc.poll() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith((b"+PONG", b"-NOAUTH")):  # up (with --requirepass: locked)
                        return True
            except OSError:
                pass
            time.sleep(0.01)
        self.proc.kill()
        self.proc.wait()
        return False

    def client(self):
        import redis
        pw = self.extra[self.extra.index("--requirepass") + 1] if "--requirepass" in self.extra else None
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=10, password=pw)

    def kill(self):
        """SIGKILL: no shutdown save; only what the AOF holds survives."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def restart(self):
        self.kill()
        for _ in range(50):  # bounded: the port may take a moment to be free again
            if self._start():
                return
            time.sleep(0.1)
        raise RuntimeError("redis-server did not come back on its port")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def free_port():
    """A port free on 127.0.0.1 now (for programs that cannot report a port 0 they bound)."""
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def metric_sum(text, name, labels=""):
    """The sum of the samples of `name` in Prometheus text; with `labels` (e.g. 'op="write"'),
    only the samples whose labels start with them."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        if (line.startswith(name + "{" + labels) if labels
                else line.startswith(name + " ") or line.startswith(name + "{")):
            total += float(line.rsplit(" ", 1)[1])
    return total


def openai_chat(port, messages, session=None, max_tokens=12, stream=False, model="retnet-default"):
    """(status, JSON body) of one greedy POST /v1/chat/completions to 127.0.0.1:`port`, with
    `session` as x-session-id; streamed: the deltas joined into the body's one message."""
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
            "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    headers = {"Content-Type": "application/json", **({"x-session-id": session} if session else {})}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers=headers)
    r = conn.getresponse()
    data = r.read().decode()
    conn.close()
    if r.status != 200 or not stream:
        return r.status, json.loads(data)
    text, usage = "", None
    for line in data.split("\n"):
        if line.startswith("data: {"):
            event = json.loads(line[6:])
            for c in event.get("choices", []):
                text += c["delta"].get("content") or ""
            usage = event.get("usage") or usage
    return 200, {"choices": [{"message": {"content": text}}], "usage": usage}
