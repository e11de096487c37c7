#!/usr/bin/env bash
# Builds the project image (the repository's Dockerfile) with podman, from local sources only: the base is the
# Debian image of base-image.sh (or TLOPS_BASE_IMAGE), never pulled, and pip reads the same package sources as
# this machine's pip (its index URLs, find-links and CA bundle), lent to the build alone as build secrets.
#
#   infra/containers/build-image.sh                  # -> localhost/tlops:0.1.0
#   TLOPS_IMAGE=localhost/tlops:dev infra/containers/build-image.sh
#   TLOPS_BASE_IMAGE=python:3.11-slim infra/containers/build-image.sh   # the official base (needs a registry)
#   TLOPS_BUILD_CONTEXT=/some/copy infra/containers/build-image.sh      # another context, this Dockerfile
#   TLOPS_TARGET=serve infra/containers/build-image.sh   # -> TLOPS_SERVE_IMAGE or localhost/tlops-serve:0.1.0
#
# Prints the build time and the image size on stderr, and the image reference on stdout (last line).
# Exit codes: 0 built; 3 SKIP (no podman); anything else: the build failed.
set -euo pipefail
cd "$(dirname "$0")/../.."

TARGET=${TLOPS_TARGET:-}
if [ "$TARGET" = serve ]; then IMAGE=${TLOPS_SERVE_IMAGE:-localhost/tlops-serve:0.1.0}; else IMAGE=${TLOPS_IMAGE:-localhost/tlops:0.1.0}; fi
BASE=${TLOPS_BASE_IMAGE:-localhost/tlops-base:bookworm}
OFFICIAL_BASE=python:3.11-slim
BUILD_TIMEOUT=${TLOPS_BUILD_TIMEOUT:-3600}

log() { echo "build-image: $*" >&2; }
command -v podman >/dev/null 2>&1 || { log "SKIP: no podman (run infra/containers/setup-podman.sh)"; exit 3; }

args=(build --pull=never --layers --tag "$IMAGE" --file "$PWD/Dockerfile")
if [ "$BASE" = "$OFFICIAL_BASE" ]; then
  args=(build --pull=missing --layers --tag "$IMAGE" --file "$PWD/Dockerfile")
else
  podman image exists "$BASE" || { log "base image $BASE is missing: run infra/containers/base-image.sh"; exit 1; }
  args+=(--build-arg "BASE_IMAGE=$BASE")
fi
if [ -n "$TARGET" ]; then args+=(--target "$TARGET"); fi

# pip's configuration on this machine (environment first, then pip.conf), handed to the build as a pip.conf
# build secret (its URLs then stay out of the layers' cache keys: a new port does not rebuild torch). Local
# sources (file:// indexes, wheel directories) are served over HTTP on 127.0.0.1 for the build's length, and the
# build shares the host's network to reach them: a `podman build -v` mount would leave its mount points behind.
PIP_CMD=${PIP_CMD:-python3 -m pip}
pip_setting() {  # pip_setting NAME (e.g. extra-index-url)
  local env_name
  env_name="PIP_$(echo "$1" | tr 'a-z-' 'A-Z_')"
  if [ -n "${!env_name:-}" ]; then echo "${!env_name}"; return; fi
  $PIP_CMD config get "global.$1" 2>/dev/null || $PIP_CMD config get ":env:.$1" 2>/dev/null || true
}
srv=$(mktemp -d)
server_pid=
cleanup() { [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null; rm -rf "$srv" "$srv.log" "$srv.conf"; }
trap cleanup EXIT
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
server_log=$srv.log
pip_conf=$srv.conf
echo "[global]" >"$pip_conf"
served=0
serve() {  # serve URL-OR-PATH: sets $url to what the build uses for it (no subshell: $served counts)
  local path=${1#file://} rest=
  url=$1
  if [ "${path:0:1}" != / ] || [ ! -e "$path" ]; then return 0; fi
  path=${path%/}
  if [ "$(basename "$path")" = simple ]; then rest=simple/; path=$(dirname "$path"); fi  # links go ../../files
  served=$((served + 1))
  ln -s -T "$path" "$srv/src$served"
  url="http://127.0.0.1:$port/src$served/$rest"
}
for setting in index-url extra-index-url find-links; do
  value=$(pip_setting "$setting" | tr '\n' ' ' | xargs || true)
  [ -n "$value" ] || continue
  urls=()
  for source in $value; do serve "$source"; urls+=("$url"); done
  echo "$setting = ${urls[*]}" >>"$pip_conf"
done
if [ "$served" -gt 0 ]; then
  python3 -m http.server --bind 127.0.0.1 --directory "$srv" "$port" >"$server_log" 2>&1 &
  server_pid=$!
  for _ in $(seq 50); do
    python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$port/', timeout=2)" 2>/dev/null && break
    sleep 0.2
  done
  echo "trusted-host = 127.0.0.1" >>"$pip_conf"
  args+=(--network host)
  log "serving $served local package source(s) to the build on 127.0.0.1:$port: $(readlink "$srv"/src* | xargs)"
fi
cert=$(pip_setting cert)
if [ -n "$cert" ] && [ -f "$cert" ]; then
  # A proxy that re-signs TLS: its CA bundle is a build secret, never copied into the image.
  echo "cert = /run/pip-ca.crt" >>"$pip_conf"
  args+=(--secret "id=pip-ca,src=$cert")
fi
args+=(--secret "id=pip-conf,src=$pip_conf")
log "pip.conf for the build: $(tail -n +2 "$pip_conf" | tr '\n' ';')"

log "podman ${args[*]} ${TLOPS_BUILD_CONTEXT:-.}"
start=$(date +%s)
timeout "$BUILD_TIMEOUT" podman "${args[@]}" "${TLOPS_BUILD_CONTEXT:-.}" >&2
seconds=$(( $(date +%s) - start ))
size=$(podman image inspect --format '{{.Size}}' "$IMAGE")
[ "$served" -gt 0 ] && log "wheels fetched from the local sources: $(grep -c '\.whl' "$server_log" || true)"
log "built $IMAGE in ${seconds}s, $(numfmt --to=iec "$size") ($size bytes)"
echo "$IMAGE"
