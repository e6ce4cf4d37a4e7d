#!/usr/bin/env bash
# Clang's thread-safety analysis over the project's own sources: every .cc under engine/,
# server/, client/ and model/ that includes absl/synchronization (directly or through the
# project's headers) is checked with
#   clang++-14 -fsyntax-only -Wthread-safety -Werror=thread-safety
# using the include paths and defines CMake recorded in build/compile_commands.json (GCC's
# precompiled header is replaced by the headers it holds). Any warning of the -Wthread-safety
# family fails the run, and so does a file clang cannot compile.
#
# Every file is checked strictly. RETNET_TSA_SKIP_FAILING (space-separated shell patterns
# relative to the repository; default empty) names files whose diagnostics are printed as
# SKIPPED instead of failing the run, for a file in the middle of a rewrite; a header's
# diagnostics count against the header, not against every file including it.
#
# Usage: scripts/thread-safety.sh [build dir, default build]
# Env:   RETNET_TSA_JOBS (default nproc), RETNET_TSA_CLANG (default clang++-14).
set -euo pipefail
cd "$(dirname "$0")/.."
build="${1:-build}"
clang="${RETNET_TSA_CLANG:-clang++-14}"
jobs="${RETNET_TSA_JOBS:-$(nproc)}"
skip_failing="${RETNET_TSA_SKIP_FAILING-}"
if ! command -v "$clang" >/dev/null 2>&1 && [ "$clang" = clang++-14 ]; then
  # scripts/install-deps.sh installs it; this covers a build machine set up before it did.
  sudo_cmd=()
  [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
  echo "thread-safety: installing clang-14" >&2
  export DEBIAN_FRONTEND=noninteractive
  "${sudo_cmd[@]}" apt-get update -qq >/dev/null || true
  "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends clang-14 >/dev/null || true
fi
if ! command -v "$clang" >/dev/null 2>&1; then
  echo "thread-safety: $clang not found (Debian: apt-get install clang-14)" >&2
  exit 1
fi
if [ ! -f "$build/compile_commands.json" ]; then
  echo "thread-safety: $build/compile_commands.json missing: configure first (scripts/build.sh)" >&2
  exit 1
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# One clang command line per file, NUL-separated: "<file>\t<argv...>".
/usr/bin/python3 - "$build/compile_commands.json" "$clang" "$work" <<'EOF'
import json, os, re, shlex, sys

db_path, clang, work = sys.argv[1:4]
root = os.getcwd()
include_re = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.M)
sync_re = re.compile(r'^\s*#\s*include\s+"absl/synchronization/', re.M)
cache = {}

def uses_sync(path, seen):
    """Whether `path` includes absl/synchronization, directly or via project headers."""
    if path in cache:
        return cache[path]
    if path in seen:
        return False
    seen.add(path)
    try:
        text = open(path, encoding="utf-8", errors="replace").read()
    except OSError:
        return False
    found = bool(sync_re.search(text))
    if not found:
        for inc in include_re.findall(text):
            header = os.path.join(root, inc)
            if os.path.isfile(header) and uses_sync(header, seen):
                found = True
                break
    cache[path] = found
    return found

out = []
for entry in json.load(open(db_path)):
    path = os.path.realpath(os.path.join(entry["directory"], entry["file"]))
    rel = os.path.relpath(path, root)
    if rel.split(os.sep)[0] not in ("engine", "server", "client", "model") or not rel.endswith(".cc"):
        continue
    if not uses_sync(path, set()):
        continue
    argv = entry["arguments"] if "arguments" in entry else shlex.split(entry["command"])
    keep = [clang, "-fsyntax-only", "-Wthread-safety", "-Werror=thread-safety", "-ferror-limit=0"]
    i = 1
    while i < len(argv):
        a = argv[i]
        nxt = argv[i + 1] if i + 1 < len(argv) else ""
        if a in ("-I", "-isystem", "-D", "-U") and nxt:
            keep += [a, nxt]
            i += 2
            continue
        if a == "-include" and nxt:
            if nxt.endswith("cmake_pch.hxx"):  # GCC's precompiled header: its headers instead
                for h in re.findall(r"#include\s+<([^>]+)>", open(nxt).read()):
                    keep += ["-include", h]
            else:
                keep += [a, nxt]
            i += 2
            continue
        if a.startswith(("-I", "-D", "-U", "-std=", "-isystem")):
            keep.append(a)
        i += 1
    keep.append(path)
    out.append(rel + "\t" + "\t".join(keep))
with open(os.path.join(work, "commands"), "w") as f:
    f.write("\0".join(sorted(out)))
EOF

check_one() {
  local line="$1" work="$2"
  local rel="${line%%$'\t'*}"
  local -a argv
  IFS=$'\t' read -r -a argv <<<"${line#*$'\t'}"
  local log="$work/$(echo "$rel" | tr '/' '_').log"
  local start=$SECONDS
  if "${argv[@]}" >"$log" 2>&1 && ! grep -q 'Wthread-safety' "$log"; then
    echo "ok   $rel ($((SECONDS - start)) s)"
  else
    echo "diagnostics: $rel ($((SECONDS - start)) s)"
    echo "$rel" >>"$work/failed"
  fi
}
export -f check_one

start=$SECONDS
count=$(tr -cd '\0' <"$work/commands" | wc -c)
echo "thread-safety: $((count + 1)) files with $clang, $jobs jobs"
xargs -0 -P "$jobs" -I{} bash -c 'check_one "$1" "$2"' _ {} "$work" <"$work/commands"

status=0
if [ -f "$work/failed" ]; then
  # Each error and thread-safety warning, by the file it is in: skipped files' count as skipped.
  sort "$work/failed" >"$work/failed.sorted"
  /usr/bin/python3 - "$work" "$(pwd)" "$skip_failing" <"$work/failed.sorted" <<'EOF' || status=1
import fnmatch, os, re, sys

work, root, patterns = sys.argv[1], sys.argv[2], sys.argv[3].split()
diag = re.compile(r"^(.*?):(\d+):(\d+): (warning|error): (.*)$")
skipped, failing = {}, {}
for rel in open(os.path.join(work, "failed.sorted")).read().split():
    log = open(os.path.join(work, rel.replace("/", "_") + ".log"), errors="replace").read()
    counted = False
    for line in log.splitlines():
        m = diag.match(line)
        if not m:
            continue
        path, kind, text = m.group(1), m.group(4), m.group(5)
        if kind == "warning" and "thread-safety" not in text:
            continue  # other warnings are not this check's business
        where = os.path.relpath(os.path.realpath(path), root) if os.path.isabs(path) else path
        counted = True
        target = skipped if any(fnmatch.fnmatch(where, p) for p in patterns) else failing
        target.setdefault(where, set()).add(f"{where}:{m.group(2)}: {text}")
    if not counted:  # failed without a located diagnostic (e.g. clang crashed)
        failing.setdefault(rel, set()).add(f"{rel}: clang failed:\n{log}")
for where in sorted(skipped):
    print(f"thread-safety: SKIPPED {where} (in RETNET_TSA_SKIP_FAILING; to be fixed there):")
    for d in sorted(skipped[where]):
        print(f"  {d}")
for where in sorted(failing):
    print(f"thread-safety: FAIL {where}:", file=sys.stderr)
    for d in sorted(failing[where]):
        print(f"  {d}", file=sys.stderr)
sys.exit(1 if failing else 0)
EOF
fi
echo "thread-safety: $((SECONDS - start)) s, $([ $status = 0 ] && echo passed || echo FAILED)"
exit $status
