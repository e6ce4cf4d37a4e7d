"""The deployment files are consistent with the repository (no Docker engine runs here).

usage: test_deploy_files.py --root REPO [--nginx /usr/sbin/nginx] [--compose docker-compose]

- every path a Dockerfile COPYs from the build context exists, and is not excluded by .dockerignore;
- docker-compose.yml is valid with every profile (`docker-compose config`), and every build it
  names points at a Dockerfile that exists;
- every Kubernetes manifest parses; the gateway ConfigMap carries the nginx template verbatim; the
  pods' termination grace exceeds the server's drain grace; probes use gRPC health;
- the nginx template, rendered as the test of the replicas renders it, passes `nginx -t`.
"""

import argparse
import fnmatch
import os
import shlex
import shutil
import subprocess
import sys
import tempfile

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
    check(services["retnet-0"]["volumes"] == services["retnet-1"]["volumes"], "compose: replicas share one state volume")
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
    check({"ConfigMap", "Service", "PersistentVolumeClaim"} <= kinds and ({"StatefulSet", "Deployment"} & kinds),
          f"k8s manifests parse ({sorted(kinds)})")
    template = open(os.path.join(deploy, "nginx", "retnet.conf.template")).read()
    embedded = [v for d in docs if d["kind"] == "ConfigMap" for v in (d.get("data") or {}).values()]
    check(template in embedded, "k8s gateway ConfigMap carries deploy/nginx/retnet.conf.template verbatim")
    env = {k: v for d in docs if d["kind"] == "ConfigMap" for k, v in (d.get("data") or {}).items()
           if k.startswith("RETNET_")}
    pods = [d for d in docs if d["kind"] == "StatefulSet"]
    for ss in pods:
        spec_ = ss["spec"]["template"]["spec"]
        c = spec_["containers"][0]
        drain = float(env.get("RETNET_DRAIN_GRACE_S", 10))
        check(spec_.get("terminationGracePeriodSeconds", 30) > drain + 30,
              f"k8s: termination grace ({spec_.get('terminationGracePeriodSeconds')} s) covers the drain")
        check(all("grpc" in c.get(p, {}) for p in ("readinessProbe", "livenessProbe", "startupProbe")),
              "k8s: startup, readiness and liveness probes use gRPC health")
        check(c["resources"]["limits"].get("nvidia.com/gpu") in (1, "1"), "k8s: one GPU per replica")

    if os.path.exists(args.nginx):
        with tempfile.TemporaryDirectory() as tmp:
            rendered = (template.replace("${GATEWAY_LISTEN}", "127.0.0.1:8080")
                        .replace("${RETNET_REPLICA_0}", "127.0.0.1:50051").replace("${RETNET_REPLICA_1}", "127.0.0.1:50052"))
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
