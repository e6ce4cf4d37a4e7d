"""The deployment files are consistent with the repository (no Docker engine runs here).

usage: test_deploy_files.py --root REPO [--nginx /usr/sbin/nginx] [--compose docker-compose]

- every path a Dockerfile COPYs from the build context exists, and is not excluded by .dockerignore;
- docker-compose.yml is valid with every profile (`docker-compose config`), and every build it
  names points at a Dockerfile that exists;
- the replicas share sessions through Redis, not a directory: compose's "replicas" profile has a
  redis service with AOF on every write (appendonly yes, appendfsync always) and noeviction, the
  replicas' RETNET_SESSION_STORE names it and they wait for it to be healthy, share no state
  volume and turn the images' RETNET_STATE_DIR off; in Kubernetes the Redis StatefulSet's
  redis.conf enables the same, its data is a ReadWriteOnce claim, and the replicas' store URL
  names the Redis Service's name and port; nothing uses ReadWriteMany or the removed
  RETNET_STATE_DIR_SHARED / --state-dir-shared;
- every Kubernetes manifest parses; the gateway ConfigMap carries the nginx template verbatim; the
  pods' termination grace exceeds the server's drain grace; probes use gRPC health;
- the nginx template, rendered as the test of the replicas renders it, passes `nginx -t`.
"""

import argparse
import fnmatch
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import urllib.parse

import yaml

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from harness import FAILURES, check  # noqa: E402


def dockerfile_copies(path):
    """(sources) of COPY instructions that read the build context."""
    text = open(path).read().replace("\\\n", " ")
    for line in text.splitlines():
        words = shlex.split(line.strip(), comments=True) if line.strip() else []
        if not words or words[0].upper() != "COPY":
            continue
        args = [w for w in words[1:] if not w.startswith("--")]
        if any(w.startswith("--from") for w in words[1:]):
            continue
        yield from args[:-1]


def ignored(rel, patterns):
    return any(fnmatch.fnmatch(rel, p.rstrip("/")) or rel.startswith(p.rstrip("/") + "/") for p in patterns)


REMOVED = ("ReadWriteMany", "STATE_DIR_SHARED", "state-dir-shared")


def strings(node):
    """Every key and scalar of a parsed YAML document, as strings."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield str(k)
            yield from strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from strings(v)
    elif node is not None:
        yield str(node)


def env_dict(environment):
    """A compose service's environment (a mapping or a list of NAME=value) as a dict."""
    if isinstance(environment, list):
        return dict(e.split("=", 1) if "=" in e else (e, None) for e in environment)
    return dict(environment or {})


def redis_url(url):
    """(host, port, db) of a redis:// URL, or None when it is not one."""
    u = urllib.parse.urlsplit(url or "")
    if u.scheme != "redis" or not u.hostname:
        return None
    db = u.path.lstrip("/")
    return u.hostname, u.port or 6379, int(db) if db.isdigit() else 0


def redis_conf(text):
    """redis.conf directives: {name: [args]} (the last occurrence wins)."""
    conf = {}
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        if words:
            conf[words[0].lower()] = words[1:]
    return conf


def redis_args(argv):
    """redis-server command-line options ("--name value ...") as {name: [args]}."""
    conf, name = {}, None
    for w in argv:
        if w.startswith("--"):
            name = w[2:].lower()
            conf[name] = []
        elif name is not None:
            conf[name].append(w)
    return conf


def check_redis_durable(conf, what):
    check(conf.get("appendonly") == ["yes"], f"{what}: appendonly yes ({conf.get('appendonly')})")
    check(conf.get("appendfsync") == ["always"],
          f"{what}: appendfsync always, so that no acknowledged turn is lost on a Redis crash "
          f"({conf.get('appendfsync')})")
    check(conf.get("maxmemory-policy") == ["noeviction"],
          f"{what}: maxmemory-policy noeviction (eviction drops sessions) ({conf.get('maxmemory-policy')})")
    check(conf.get("save") == [""], f"{what}: RDB snapshots off (save \"\") ({conf.get('save')})")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True)
    ap.add_argument("--nginx", default=shutil.which("nginx") or "/usr/sbin/nginx")
    ap.add_argument("--compose", default=shutil.which("docker-compose"))
    args = ap.parse_args()
    root = os.path.abspath(args.root)
    deploy = os.path.join(root, "deploy")
    patterns = [l.strip() for l in open(os.path.join(root, ".dockerignore")) if l.strip() and not l.startswith("#")]

    dockerfiles = sorted(f for f in os.listdir(deploy) if f.startswith("Dockerfile"))
    check(len(dockerfiles) >= 2, f"a CUDA and a CPU Dockerfile ({dockerfiles})")
    for name in dockerfiles:
        sources = list(dockerfile_copies(os.path.join(deploy, name)))
        missing = [s for s in sources if not os.path.exists(os.path.join(root, s))]
        excluded = [s for s in sources if ignored(s, patterns)]
        check(sources and not missing and not excluded,
              f"{name}: every COPY source exists in the context ({len(sources)} paths; missing {missing}, "
              f"excluded {excluded})")
        text = open(os.path.join(deploy, name)).read()
        if "COPY . " in text:
            # The whole context: what the top-level CMakeLists.txt builds (outside the tests)
            # must not be left out of it.
            top = open(os.path.join(root, "CMakeLists.txt")).read()
            needed = ["CMakeLists.txt", "CMakePresets.json"] + [
                d for d in re.findall(r"^add_subdirectory\((\w+)\)", top, re.M) if d != "tests"]
            dropped = [d for d in needed if ignored(d, patterns) or not os.path.exists(os.path.join(root, d))]
            check(not dropped, f"{name}: COPY . brings every directory the build needs ({needed}; "
                  f"excluded or missing {dropped})")
        check("USER " in text and "HEALTHCHECK" in text and "STOPSIGNAL SIGTERM" in text and "AS runtime" in text,
              f"{name}: multi-stage, non-root, health check, SIGTERM")

    compose_file = os.path.join(root, "docker-compose.yml")
    spec = yaml.safe_load(open(compose_file))
    services = spec["services"]
    check({"retnet", "retnet-cpu", "retnet-0", "retnet-1", "gateway", "loadtest"} <= set(services),
          "compose: GPU, CPU, two replicas, gateway and load test services")
    for svc, body in services.items():
        build = body.get("build")
        if isinstance(build, dict):
            check(os.path.exists(os.path.join(root, build.get("context", "."), build["dockerfile"])),
                  f"compose: {svc} builds from an existing Dockerfile")
    gpu = services["retnet"]["deploy"]["resources"]["reservations"]["devices"][0]
    check(gpu.get("capabilities") == ["gpu"] and gpu.get("driver") == "nvidia", "compose: GPU reservation")
    check(not [x for x in strings(spec) if any(r in x for r in REMOVED)],
          f"compose: nothing uses {', '.join(REMOVED)}")
    for extra in sorted(f for f in os.listdir(deploy) if f.startswith("compose") and f.endswith((".yml", ".yaml"))):
        other = yaml.safe_load(open(os.path.join(deploy, extra)))
        check(not [x for x in strings(other) if any(r in x for r in REMOVED)],
              f"deploy/{extra}: nothing uses {', '.join(REMOVED)}")

    # The replicas and their Redis.
    replicas = [n for n, b in services.items() if "replicas" in (b.get("profiles") or []) and
                "RETNET_DEVICE" in env_dict(b.get("environment"))]
    check(sorted(replicas) == ["retnet-0", "retnet-1"], f"compose: two retnet replicas in the replicas profile ({replicas})")
    stores = {n: redis_url(env_dict(services[n].get("environment")).get("RETNET_SESSION_STORE")) for n in replicas}
    check(all(stores.values()) and len(set(stores.values())) == 1,
          f"compose: every replica has the same redis:// RETNET_SESSION_STORE ({stores})")
    host = next(iter(stores.values()))[0] if replicas and all(stores.values()) else None
    redis = services.get(host) or {}
    check(str(redis.get("image", "")).startswith("redis:") and "replicas" in (redis.get("profiles") or []),
          f"compose: the store's host {host!r} is a redis service in the replicas profile")
    command = redis.get("command") or []
    command = shlex.split(command) if isinstance(command, str) else [str(w) for w in command]
    check(command[:1] == ["redis-server"], f"compose: {host} runs redis-server ({command[:1]})")
    check_redis_durable(redis_args(command[1:]), f"compose: {host}")
    if host:
        check(stores[replicas[0]][1] == 6379 and not redis.get("ports"),
              f"compose: replicas reach {host} on 6379 inside the network; Redis is not published on the host")
    check(any(str(v).split(":")[1:2] == ["/data"] for v in redis.get("volumes") or []),
          f"compose: {host}'s /data (the AOF) is a volume")
    check("redis-cli" in (redis.get("healthcheck") or {}).get("test", []) and
          "ping" in (redis.get("healthcheck") or {}).get("test", []), f"compose: {host} health check: redis-cli ping")
    # Images that set RETNET_STATE_DIR: their replicas must turn it off (an empty value is unset).
    image_env = [name for name in dockerfiles if "RETNET_STATE_DIR=" in open(os.path.join(deploy, name)).read()]
    for n in replicas:
        svc = services[n]
        dep = (svc.get("depends_on") or {})
        check(isinstance(dep, dict) and (dep.get(host) or {}).get("condition") == "service_healthy",
              f"compose: {n} starts once {host} is healthy")
        state = env_dict(svc.get("environment")).get("RETNET_STATE_DIR")
        check(state == "" if image_env else not state,
              f"compose: {n} turns RETNET_STATE_DIR off (it excludes --session-store; the images set it: "
              f"{image_env}) ({state!r})")
    mounts = {}
    for n, b in services.items():
        for v in b.get("volumes") or []:
            source = str(v).split(":")[0]
            if not source.startswith((".", "/")):
                mounts.setdefault(source, []).append(n)
    shared = {v: ns for v, ns in mounts.items() if len(ns) > 1}
    check(not shared, f"compose: no named volume is shared by two services ({shared})")
    for n in ("retnet", "retnet-cpu"):
        env_ = env_dict(services[n].get("environment"))
        check(env_.get("RETNET_STATE_DIR") and not env_.get("RETNET_SESSION_STORE") and services[n].get("volumes"),
              f"compose: {n} (one server) keeps its state directory on a volume")
    for name in dockerfiles:
        text = open(os.path.join(deploy, name)).read()
        check("hiredis" in text, f"{name}: installs hiredis (the Redis session store's client)")
    if args.compose:
        with tempfile.TemporaryDirectory() as tmp:
            env = dict(os.environ, HOME=tmp)
            p = subprocess.run([args.compose, "-f", compose_file, "--profile", "cpu", "--profile", "replicas",
                                "--profile", "loadtest", "config", "-q"], capture_output=True, text=True,
                               timeout=120, env=env, cwd=root)
            check(p.returncode == 0, f"docker-compose config (all profiles) {p.stderr.strip()[:300]}")

    k8s = os.path.join(deploy, "k8s")
    docs = []
    for name in sorted(os.listdir(k8s)):
        if name.endswith((".yaml", ".yml")):
            docs += [d for d in yaml.safe_load_all(open(os.path.join(k8s, name))) if d]
    kinds = {d["kind"] for d in docs}
    check({"ConfigMap", "Service", "StatefulSet", "Deployment"} <= kinds, f"k8s manifests parse ({sorted(kinds)})")
    check(not [x for d in docs for x in strings(d) if any(r in x for r in REMOVED)],
          f"k8s: nothing uses {', '.join(REMOVED)}")
    check(not [d for d in docs if d["kind"] == "PersistentVolumeClaim"], "k8s: no shared PersistentVolumeClaim")
    template = open(os.path.join(deploy, "nginx", "retnet.conf.template")).read()
    embedded = [v for d in docs if d["kind"] == "ConfigMap" for v in (d.get("data") or {}).values()]
    check(template in embedded, "k8s gateway ConfigMap carries deploy/nginx/retnet.conf.template verbatim")
    env = {k: v for d in docs if d["kind"] == "ConfigMap" for k, v in (d.get("data") or {}).items()
           if k.startswith("RETNET_")}
    statefulsets = [d for d in docs if d["kind"] == "StatefulSet"]
    redis_sets = [d for d in statefulsets
                  if d["spec"]["template"]["spec"]["containers"][0]["image"].startswith("redis:")]
    pods = [d for d in statefulsets if d not in redis_sets]
    check(len(pods) == 1 and len(redis_sets) == 1, "k8s: a StatefulSet for the replicas and one for Redis")
    configmaps = {d["metadata"]["name"]: d.get("data") or {} for d in docs if d["kind"] == "ConfigMap"}
    redis_port = None
    for ss in redis_sets:
        name = ss["metadata"]["name"]
        check(ss["spec"].get("replicas", 1) == 1, f"k8s: {name}: one Redis pod (a single writer)")
        pod = ss["spec"]["template"]["spec"]
        c = pod["containers"][0]
        conf = {}
        for vol in pod.get("volumes") or []:
            for k, text in configmaps.get((vol.get("configMap") or {}).get("name"), {}).items():
                if k.endswith(".conf"):
                    conf.update(redis_conf(text))
        argv = " ".join(str(w) for w in (c.get("command") or []) + (c.get("args") or []))
        check("redis-server" in argv and "/etc/redis/redis.conf" in argv and conf,
              f"k8s: {name} runs redis-server with the redis.conf of its ConfigMap")
        mount_dirs = {m["mountPath"]: m["name"] for m in c.get("volumeMounts") or []}
        check(any(m.get("mountPath") == "/etc/redis" and m.get("name") in
                  [v["name"] for v in pod.get("volumes") or [] if "configMap" in v] for m in c.get("volumeMounts") or []),
              f"k8s: {name}'s redis.conf is mounted at /etc/redis")
        check_redis_durable(conf, f"k8s: {name} redis.conf")
        check(conf.get("dir") == ["/data"], f"k8s: {name} keeps its AOF in /data ({conf.get('dir')})")
        claims = {t["metadata"]["name"]: t["spec"] for t in ss["spec"].get("volumeClaimTemplates") or []}
        data = claims.get(mount_dirs.get("/data"))
        check(data is not None and data.get("accessModes") == ["ReadWriteOnce"],
              f"k8s: {name}'s /data is a ReadWriteOnce volumeClaimTemplate")
        check(all("redis-cli" in ((c.get(p) or {}).get("exec") or {}).get("command", []) and
                  "ping" in ((c.get(p) or {}).get("exec") or {}).get("command", [])
                  for p in ("readinessProbe", "livenessProbe")),
              f"k8s: {name}: readiness and liveness probes run redis-cli ping")
        check(bool((c.get("resources") or {}).get("requests")), f"k8s: {name} has resource requests")
        ports = {p.get("name"): p["containerPort"] for p in c.get("ports") or []}
        labels = ss["spec"]["template"]["metadata"]["labels"]
        for svc in (d for d in docs if d["kind"] == "Service"):
            sel = svc["spec"].get("selector") or {}
            if sel and all(labels.get(k) == v for k, v in sel.items()):
                for p in svc["spec"]["ports"]:
                    target = p.get("targetPort", p["port"])
                    if ports.get(target, target) == 6379:
                        redis_port = (svc["metadata"]["name"], p["port"])
        check(redis_port is not None, f"k8s: a Service selects {name} and forwards to its port 6379 ({redis_port})")
    for ss in pods:
        spec_ = ss["spec"]["template"]["spec"]
        c = spec_["containers"][0]
        drain = float(env.get("RETNET_DRAIN_GRACE_S", 10))
        check(spec_.get("terminationGracePeriodSeconds", 30) > drain + 30,
              f"k8s: termination grace ({spec_.get('terminationGracePeriodSeconds')} s) covers the drain")
        check(all("grpc" in c.get(p, {}) for p in ("readinessProbe", "livenessProbe", "startupProbe")),
              "k8s: startup, readiness and liveness probes use gRPC health")
        check(c["resources"]["limits"].get("nvidia.com/gpu") in (1, "1"), "k8s: one GPU per replica")
        pod_env = {}
        for ref in c.get("envFrom") or []:
            pod_env.update(configmaps.get((ref.get("configMapRef") or {}).get("name"), {}))
        pod_env.update({e["name"]: e.get("value") for e in c.get("env") or []})
        store = redis_url(pod_env.get("RETNET_SESSION_STORE"))
        check(store is not None and redis_port is not None and
              (store[0].split(".")[0], store[1]) == redis_port,
              f"k8s: the replicas' RETNET_SESSION_STORE ({pod_env.get('RETNET_SESSION_STORE')}) names the Redis "
              f"Service and port {redis_port}")
        check(pod_env.get("RETNET_STATE_DIR") == "" if image_env else not pod_env.get("RETNET_STATE_DIR"),
              f"k8s: the replicas turn RETNET_STATE_DIR off ({pod_env.get('RETNET_STATE_DIR')!r})")
        check(not c.get("volumeMounts") and not spec_.get("volumes") and not ss["spec"].get("volumeClaimTemplates"),
              "k8s: the replicas mount no state volume")
        secret = [e for e in c.get("env") or [] if e["name"] == "RETNET_SESSION_STORE_PASSWORD"]
        check(all(((e.get("valueFrom") or {}).get("secretKeyRef") or {}).get("optional") is True for e in secret),
              "k8s: RETNET_SESSION_STORE_PASSWORD, if set, comes from an optional Secret")

    if os.path.exists(args.nginx):
        with tempfile.TemporaryDirectory() as tmp:
            rendered = (template.replace("${GATEWAY_LISTEN}", "127.0.0.1:8080")
                        .replace("${GATEWAY_HTTP_LISTEN}", "127.0.0.1:8081")
                        .replace("${RETNET_REPLICA_0_HTTP}", "127.0.0.1:8000")
                        .replace("${RETNET_REPLICA_1_HTTP}", "127.0.0.1:8001")
                        .replace("${RETNET_REPLICA_0}", "127.0.0.1:50051").replace("${RETNET_REPLICA_1}", "127.0.0.1:50052"))
            check("${" not in rendered, "the gateway template has only the documented variables")
            open(os.path.join(tmp, "retnet.conf"), "w").write(rendered)
            os.makedirs(os.path.join(tmp, "logs"))
            open(os.path.join(tmp, "nginx.conf"), "w").write(
                f"pid {tmp}/nginx.pid;\nerror_log {tmp}/logs/error.log;\nevents {{}}\n"
                f"http {{ access_log off; client_body_temp_path {tmp}/body; include {tmp}/retnet.conf; }}\n")
            p = subprocess.run([args.nginx, "-t", "-p", tmp, "-c", f"{tmp}/nginx.conf"], capture_output=True,
                               text=True, timeout=60)
            check(p.returncode == 0, f"nginx -t accepts the rendered gateway template {p.stderr.strip()[-300:]}")
    print(f"{len(FAILURES)} failure(s)" if FAILURES else "all checks passed")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
