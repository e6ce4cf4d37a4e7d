"""The CPU image (deploy/Dockerfile.cpu) built with podman and run the way a container runtime would.

usage: test_image.py --root REPO --stubs build/python [--work DIR] [--reuse-base] [--report FILE]

Build (../shared/reference/containers.md's recipe, as root): a Debian 12 root filesystem made in
this run with mmdebstrap, imported into podman (storage driver vfs, its own storage under
$RETNET_PODMAN_ROOT, default /var/tmp/retnet-podman), then `podman build --format docker
--isolation chroot` of the shipped Dockerfile (docker format: HEALTHCHECK and SHELL are kept).

Run: podman cannot start containers on these machines (crun and the hybrid cgroup layout), so a
container is a `podman create` + `podman mount` root filesystem (the image's layers plus a
writable one, as a runtime has) in which the image's ENTRYPOINT runs as PID 1 of its own pid and
mount namespaces (unshare), chrooted, as the image's USER (setpriv), with exactly the image's
ENV plus the overrides a `docker run -e` would give; volumes are bind mounts. The network is the
host's (as with --network host), so listen addresses are overridden to 127.0.0.1 free ports.

Checks: the image's metadata (user, entrypoint, ports, volume, stop signal, health check); the
server starts as the non-root user with the built-in model; the image's HEALTHCHECK command
reports SERVING; a generation streams text; SIGTERM drains and the container exits 0; a state
volume survives a restart of the container with its sessions intact; the compose `replicas`
topology (two containers of the image with compose's environment, Redis with compose's
arguments, the nginx gateway from the template) moves a session between replicas exactly; the
image's size. Exit 77 (skipped) when not root or podman / mmdebstrap are missing.
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, "..")]
from harness import FAILURES, RedisServer, check, free_port  # noqa: E402

IMAGE = "localhost/retnet-serve:cpu-test"
BASE = "localhost/debian:12-mmdebstrap"



class Podman:
    def __init__(self, root):
        self.cmd = ["podman", "--root", os.path.join(root, "storage"), "--runroot",
                    os.path.join(root, "run"), "--storage-driver", "vfs"]

    def __call__(self, *args, timeout=600, log=None):
        p = subprocess.run(self.cmd + list(args), capture_output=log is None, text=True, timeout=timeout,
                           stdout=open(log, "a") if log else None,
                           stderr=subprocess.STDOUT if log else None)
        if p.returncode != 0:
            tail = open(log).read()[-4000:] if log else (p.stderr or "")[-4000:]
            raise RuntimeError(f"podman {' '.join(args[:3])}: exit {p.returncode}\n{tail}")
        return (p.stdout or "").strip()


class Container:
    """One container of the image: a writable root filesystem, the entrypoint as PID 1 of its own
    namespaces, as the image's user, with the image's environment (+ `env`), `volumes` bound."""

    def __init__(self, podman, config, name, env=(), args=(), volumes=(), log=None):
        self.podman, self.name, self.config = podman, name, config
        self.id = podman("create", "--name", name, IMAGE)
        self.root = podman("mount", self.id)
        self.env = dict(e.split("=", 1) for e in config.get("Env") or [])
        self.env.update(dict(env))
        user = config.get("User") or "root"
        self.uid, self.gid = self._ids(user)
        self.env.setdefault("HOME", self._home(user))
        self.env.setdefault("HOSTNAME", name)
        binds = "".join(f"mount --bind '{host}' '{self.root}{path}' && " for host, path in volumes)
        entry = (config.get("Entrypoint") or []) + list(args)
        self.log = open(log, "ab") if log else None
        self.proc = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--mount", f"--mount-proc={self.root}/proc", "sh", "-c",
             f"{binds}exec chroot '{self.root}' setpriv --reuid={self.uid} --regid={self.gid} --init-groups "
             f"env -i {' '.join(self._q(k + '=' + v) for k, v in self.env.items())} "
             f"sh -c 'cd \"{config.get('WorkingDir') or '/'}\" && exec \"$@\"' entry "
             f"{' '.join(self._q(a) for a in entry)}"],
            stdout=self.log, stderr=subprocess.STDOUT if self.log else None)

    @staticmethod
    def _q(s):
        return "'" + s.replace("'", "'\\''") + "'"

    def _ids(self, user):
        if ":" in user:
            u, g = user.split(":", 1)
        else:
            u, g = user, None
        for line in open(os.path.join(self.root, "etc/passwd")):
            f = line.split(":")
            if f[0] == u or f[2] == u:
                return int(f[2]), int(g) if g and g.isdigit() else int(f[3])
        return int(u), int(g or u)

    def _home(self, user):
        for line in open(os.path.join(self.root, "etc/passwd")):
            f = line.split(":")
            if f[0] == user.split(":")[0]:
                return f[5]
        return "/"

    def exec(self, argv, timeout=60):
        """A command in the container's filesystem as its user with its environment (docker exec)."""
        env = " ".join(self._q(k + "=" + v) for k, v in self.env.items())
        return subprocess.run(
            ["chroot", self.root, "setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--init-groups",
             "sh", "-c", f"exec env -i {env} \"$@\"", "exec"] + list(argv),
            capture_output=True, text=True, timeout=timeout)

    def healthcheck(self):
        test = (self.config.get("Healthcheck") or {}).get("Test") or []
        if not test:
            return None
        argv = ["sh", "-c", test[1]] if test[0] == "CMD-SHELL" else test[1:]
        return self.exec(argv)

    def server_pids(self):
        """Host pids of processes whose executable lies in this container's filesystem."""
        pids = []
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    if os.readlink(f"/proc/{d}/exe").startswith(self.root + "/"):
                        pids.append(int(d))
                except OSError:
                    pass
        return pids

    def uids(self, pid):
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("Uid:"):
                return [int(x) for x in line.split()[1:]]
        return []

    def stop(self, timeout=90):
        """What `docker stop` does: the stop signal to PID 1, SIGKILL after `timeout`."""
        sig = getattr(signal, self.config.get("StopSignal") or "SIGTERM")
        for pid in self.server_pids():
            os.kill(pid, sig)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return self.proc.returncode

    def remove(self):
        if self.proc.poll() is None:
            for pid in self.server_pids():
                os.kill(pid, signal.SIGKILL)
            self.proc.kill()
            self.proc.wait()
        if self.log:
            self.log.close()
        self.podman("umount", self.id)
        self.podman("rm", "-f", self.id)


def wait_healthy(c, limit_s):
    """Runs the image's HEALTHCHECK until it passes (its start period), bounded."""
    t_end = time.monotonic() + limit_s
    last = None
    while time.monotonic() < t_end:  # bounded
        if c.proc.poll() is not None:
            return False, f"exited {c.proc.returncode}"
        last = c.healthcheck()
        if last is not None and last.returncode == 0:
            return True, last.stdout.strip()
        time.sleep(0.2)
    return False, last.stdout + last.stderr if last else "no health check"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True)
    ap.add_argument("--stubs", required=True)
    ap.add_argument("--work", default=None)
    ap.add_argument("--reuse-base", action="store_true",
                    help="use the base image from an earlier run if there is one (faster iteration)")
    ap.add_argument("--report", default=None, help="write the image sizes and build time here (JSON)")
    ap.add_argument("--nginx", default=shutil.which("nginx") or "/usr/sbin/nginx")
    args = ap.parse_args()
    missing = [t for t in ("podman", "mmdebstrap", "unshare", "setpriv", "chroot") if not shutil.which(t)]
    if os.geteuid() != 0 or missing:
        print(f"skipped: needs root and {missing or 'podman, mmdebstrap'} (scripts/install-deps.sh)")
        return 77
    if os.environ.get("RETNET_SKIP_IMAGE_TEST"):
        print("skipped: RETNET_SKIP_IMAGE_TEST is set")
        return 77
    sys.path[:0] = [args.stubs, os.path.join(args.root, "client/python")]
    import grpc
    import yaml
    from retnet_client import Client
    from test_replicas import Gateway

    store = os.environ.get("RETNET_PODMAN_ROOT", "/var/tmp/retnet-podman")
    os.makedirs(store, exist_ok=True)
    podman = Podman(store)
    work = args.work or tempfile.mkdtemp(prefix="retnet-image-")
    os.makedirs(work, exist_ok=True)
    build_log = os.path.join(work, "build.log")
    report = {}
    containers = []
    try:
        # 1. The base image, made in this run, and the build.
        have_base = bool(podman("images", "-q", BASE))
        if not (args.reuse_base and have_base):
            t0 = time.monotonic()
            tar = os.path.join(work, "base.tar")
            subprocess.run(["mmdebstrap", "--variant=minbase", "--quiet", "bookworm", tar], check=True, timeout=900)
            podman("import", tar, BASE)
            os.unlink(tar)
            report["base_s"] = round(time.monotonic() - t0, 1)
        t0 = time.monotonic()
        try:
            podman("build", "--format", "docker", "--isolation", "chroot", "--network", "host",
                   "--build-arg", f"DEBIAN_IMAGE={BASE}", "--build-arg", f"BUILD_JOBS={os.cpu_count()}",
                   "-f", os.path.join(args.root, "deploy/Dockerfile.cpu"), "-t", IMAGE, args.root,
                   timeout=3000, log=build_log)
            built = True
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            print(str(e)[-4000:])
            built = False
        report["build_s"] = round(time.monotonic() - t0, 1)
        check(built, f"deploy/Dockerfile.cpu builds with podman ({report['build_s']} s)")
        if not built:
            return 1
        info = json.loads(podman("image", "inspect", IMAGE))[0]
        config = dict(info.get("Config") or {})
        config.setdefault("Healthcheck", info.get("Healthcheck"))  # podman keeps it beside Config
        report["image_bytes"] = info.get("Size")
        report["base_bytes"] = json.loads(podman("image", "inspect", BASE))[0].get("Size")
        print(f"image {IMAGE}: {info.get('Size', 0) / 1e6:.0f} MB (base {report['base_bytes'] / 1e6:.0f} MB)")
        check(config.get("User") == "retnet", f"the image runs as the user retnet ({config.get('User')})")
        check(config.get("Entrypoint") == ["/opt/retnet/bin/retnet-server"], "ENTRYPOINT is the server")
        check({"50051/tcp", "8000/tcp", "9100/tcp"} <= set(config.get("ExposedPorts") or {}),
              f"EXPOSE 50051 8000 9100 ({sorted(config.get('ExposedPorts') or {})})")
        check("/var/lib/retnet/state" in (config.get("Volumes") or {}), "VOLUME /var/lib/retnet/state")
        check(config.get("StopSignal") == "SIGTERM", "STOPSIGNAL SIGTERM")
        check(bool((config.get("Healthcheck") or {}).get("Test")), "a HEALTHCHECK is kept (docker format)")

        # 2. One container with a state volume: start, health, a generation, SIGTERM, restart.
        volume = os.path.join(work, "state-volume")
        os.makedirs(volume)
        uid = None

        def single(name):
            port, http = free_port(), free_port()
            c = Container(podman, config, name, volumes=[(volume, "/var/lib/retnet/state")],
                          env={"RETNET_LISTEN": f"127.0.0.1:{port}", "RETNET_HTTP_LISTEN": f"127.0.0.1:{http}",
                               "RETNET_METRICS_LISTEN": "127.0.0.1:0", "RETNET_DRAIN_GRACE_S": "10"},
                          log=os.path.join(work, name + ".log"))
            containers.append(c)
            c.target = f"127.0.0.1:{port}"
            return c

        c1 = single("retnet-a")
        os.chown(volume, *c1._ids("retnet"))  # as a named volume gets the image directory's owner
        ok, out = wait_healthy(c1, 120)
        check(ok and "SERVING" in out, f"the image's HEALTHCHECK command reports SERVING ({out})")
        pids = c1.server_pids()
        uid = c1.uid
        check(len(pids) == 1 and c1.uids(pids[0])[0] == uid != 0,
              f"the server runs as the image's non-root user (uid {uid}; pids {pids})")
        with Client(c1.target, retries=0) as cl:
            model = cl.model_info()
            check("default-model" in model.checkpoint and model.vocab_size == 258,
                  f"the built-in model is served ({model.checkpoint}, vocabulary {model.vocab_size})")
            pieces = list(cl.generate("In the beginning", session="img", max_new_tokens=24, temperature=0,
                                      ignore_eos=True))
            text = "".join(p.text for p in pieces)
            check(len(pieces) == 24 and text, f"a generation streams text ({text!r})")
            cl.fork_session("img", "img-probe")
            want = cl.complete(" and then", session="img-probe", max_new_tokens=12, temperature=0,
                               ignore_eos=True).tokens
            cl.delete_session("img-probe")
            position = cl.session("img").position
        rc = c1.stop()
        check(rc == 0, f"SIGTERM drains and the container exits 0 ({rc})")
        snaps = [f for f in os.listdir(volume) if f.endswith(".snap")]
        check(snaps and all(os.stat(os.path.join(volume, f)).st_uid == uid for f in snaps),
              f"the drain wrote the session into the volume as the image's user ({snaps})")
        c1.remove()
        containers.remove(c1)
        c2 = single("retnet-b")
        ok, out = wait_healthy(c2, 120)
        with Client(c2.target, retries=0) as cl:
            same = ok and cl.session("img").position == position
            nxt = cl.complete(" and then", session="img", max_new_tokens=12, temperature=0,
                              ignore_eos=True).tokens
        check(same and nxt == want, "the state volume survives a new container: the session continues exactly")
        check(c2.stop() == 0, "the second container drains and exits 0")
        c2.remove()
        containers.remove(c2)

        # 3. The compose `replicas` topology, from the image: compose's Redis arguments and
        #    replica environment, the gateway template; addresses moved to 127.0.0.1 free ports.
        compose = yaml.safe_load(open(os.path.join(args.root, "docker-compose.yml")))
        services = compose["services"]
        replica_names = [n for n, s in services.items()
                         if "replicas" in (s.get("profiles") or []) and "RETNET_SESSION_STORE" in (s.get("environment") or {})]
        check(len(replica_names) == 2, f"compose's replicas profile has two replicas ({replica_names})")
        redis_args = services["redis"]["command"][1:]
        redis = RedisServer(work, "redis", shutil.which("redis-server") or "/usr/bin/redis-server", *redis_args)
        try:
            replicas = []
            for n in replica_names:
                env = {k: str(v) for k, v in services[n]["environment"].items()}
                env["RETNET_SESSION_STORE"] = redis.url  # the service name "redis", here on the host
                port = free_port()
                # (an empty variable counts as unset, so the other two get port 0, not "off")
                env.update({"RETNET_LISTEN": f"127.0.0.1:{port}", "RETNET_HTTP_LISTEN": "127.0.0.1:0",
                            "RETNET_METRICS_LISTEN": "127.0.0.1:0"})
                c = Container(podman, config, n, env=env.items(), log=os.path.join(work, n + ".log"))
                c.target = f"127.0.0.1:{port}"
                containers.append(c)
                replicas.append(c)
            health = [wait_healthy(c, 120)[0] for c in replicas]
            check(all(health), f"both replica containers are healthy ({health})")
            gw = Gateway(args.nginx, os.path.join(args.root, "deploy/nginx/retnet.conf.template"), work,
                         [c.target for c in replicas])
            try:
                via = Client(gw.target, retries=4)
                direct = [Client(c.target, retries=0) for c in replicas]
                sid = "compose-conv"
                via.complete("In the beginning", session=sid, max_new_tokens=8, temperature=0, ignore_eos=True)
                home = 0 if sid in {x.session_id for x in direct[0].list_sessions()} else 1
                direct[home].fork_session(sid, "compose-probe")
                want = direct[home].complete(" Selah", session="compose-probe", max_new_tokens=10,
                                             temperature=0, ignore_eos=True).tokens
                direct[home].delete_session("compose-probe")
                check(replicas[home].stop() == 0, "a replica container drains on SIGTERM and exits 0")
                got = via.complete(" Selah", session=sid, max_new_tokens=10, temperature=0, ignore_eos=True).tokens
                moved = sid in {x.session_id for x in direct[1 - home].list_sessions()}
                check(moved and got == want,
                      "through the gateway the session continues on the other replica container, exactly")
                for c in direct:
                    c.close()
                via.close()
            finally:
                gw.stop()
        finally:
            redis.kill()
    except grpc.RpcError as e:
        check(False, f"an RPC failed: {e.code()}: {e.details()}")
    finally:
        for c in containers:
            try:
                c.remove()
            except Exception as e:  # cleanup: keep going
                print(f"cleanup {c.name}: {e}")
        if FAILURES:
            for name in sorted(os.listdir(work)):
                if name.endswith(".log") and name != "build.log":
                    print(f"--- {name} ---\n" + open(os.path.join(work, name), errors="replace").read()[-3000:])
        try:  # the layers of earlier builds that no tag holds any more (vfs keeps full copies)
            podman("image", "prune", "-f")
        except RuntimeError as e:
            print(f"cleanup: {e}")
        if args.report:
            with open(args.report, "w") as fh:
                json.dump(report, fh, indent=1)
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print(f"report: {json.dumps(report)}")
    print(f"{len(FAILURES)} failure(s)" if FAILURES else "all checks passed")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
