#!/usr/bin/env bash
# Installs (Debian, as root) and configures podman so that this machine can build and run the tlops images
# without any registry: runc as the OCI runtime, cgroupfs, the file events logger, the overlay storage driver,
# generous default ulimits. Idempotent: safe to run again; it changes only what differs.
#
#   infra/containers/setup-podman.sh        # exit 0: ready; 3: this machine cannot run containers (skip)
#
# Exit codes: 0 ready; 3 SKIP (not root, no apt-get to install podman, or the kernel/sandbox refuses to run a
# container); anything else is a real failure (a broken configuration, a failed install).
# Checks, in order: `podman info` answers, a trivial image imported from a local tarball (no pull) runs with no
# network, the same image runs on the default (CNI bridge) network and in a pod, which `podman kube play` needs.
set -euo pipefail

SKIP=3
PROBE_IMAGE=localhost/tlops-probe:1
# catatonit: podman builds its pod infra (pause) image from it locally; without it `podman kube play` fails.
PACKAGES=(podman runc conmon catatonit uidmap slirp4netns fuse-overlayfs containernetworking-plugins debootstrap)
CONF=/etc/containers/containers.conf
STORAGE_CONF=/etc/containers/storage.conf
MARK="# managed by tlops infra/containers/setup-podman.sh"

log() { echo "setup-podman: $*" >&2; }
skip() { log "SKIP: $*"; exit "$SKIP"; }

[ "$(id -u)" = 0 ] || skip "not root (uid $(id -u)): installing podman and running rootful containers needs root"

missing=()
for pkg in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  command -v apt-get >/dev/null 2>&1 || skip "no apt-get to install ${missing[*]}"
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  timeout 600 apt-get update -qq || skip "apt-get update failed (no package mirror reachable?)"
  timeout 900 apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || skip "apt-get could not install ${missing[*]}"
fi
command -v podman >/dev/null 2>&1 || skip "podman is not on PATH after the install"

# write_if_changed FILE: stdin becomes FILE's content; an existing file we did not write is kept as FILE.orig.
write_if_changed() {
  local file=$1 tmp
  tmp=$(mktemp)
  cat >"$tmp"
  if [ -f "$file" ] && cmp -s "$tmp" "$file"; then rm -f "$tmp"; return 0; fi
  if [ -f "$file" ] && ! grep -qF "$MARK" "$file" && [ ! -e "$file.orig" ]; then cp -p "$file" "$file.orig"; fi
  mkdir -p "$(dirname "$file")"
  install -m 0644 "$tmp" "$file"
  rm -f "$tmp"
  log "wrote $file"
}

# runc, not crun: the sandbox these machines run in refuses crun. cgroupfs and the file events logger: no
# systemd (no D-Bus, no journald) here. nofile/nproc: PostgreSQL, MLflow's workers and torch's DataLoader
# workers open many files; the sandbox's own default is low.
write_if_changed "$CONF" <<CONFEOF
$MARK
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=4096:4096"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONFEOF

# The overlay driver (kernel overlayfs, rootful): fast layer reuse for the multi-GiB torch layer; vfs would copy
# every layer in full.
write_if_changed "$STORAGE_CONF" <<STOREOF
$MARK
[storage]
driver = "overlay"
runroot = "/run/containers/storage"
graphroot = "/var/lib/containers/storage"
STOREOF

if ! info=$(timeout 120 podman info --format '{{.Host.OCIRuntime.Name}} {{.Store.GraphDriverName}}' 2>&1); then
  log "$info"
  skip "podman info fails: this machine cannot run the container engine"
fi
log "podman $(podman --version | awk '{print $3}'), runtime and storage: $info"

# A trivial local image: /bin/true and the libraries it links, imported from a tarball (never pulled).
if ! podman image exists "$PROBE_IMAGE"; then
  root=$(mktemp -d)
  trap 'rm -rf "$root"' EXIT
  mkdir -p "$root/bin"
  cp /bin/true "$root/bin/true"
  for lib in $(ldd /bin/true | grep -o '/[^ ]*'); do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
  done
  tar -C "$root" -c . | podman import --quiet - "$PROBE_IMAGE" >/dev/null
fi

if ! out=$(timeout 120 podman run --rm --pull=never --network=none "$PROBE_IMAGE" /bin/true 2>&1); then
  log "$out"
  skip "the OCI runtime refuses to run a container here (podman run --network=none of $PROBE_IMAGE failed)"
fi
if ! out=$(timeout 120 podman run --rm --pull=never "$PROBE_IMAGE" /bin/true 2>&1); then
  log "$out"
  skip "containers run, but not on the default bridge network (CNI): pods could not reach each other"
fi
# A pod: its infra container comes from the pause image podman builds locally (catatonit), never pulled.
pod=tlops-probe-$$
if ! out=$(timeout 120 podman pod create --name "$pod" 2>&1 && timeout 120 podman run --rm --pull=never --pod "$pod" \
    "$PROBE_IMAGE" /bin/true 2>&1); then
  podman pod rm -f "$pod" >/dev/null 2>&1 || true
  log "$out"
  skip "containers run, but not in a pod (podman kube play needs pods)"
fi
podman pod rm -f "$pod" >/dev/null 2>&1 || true
log "ready: podman runs local images (no network, on the default bridge network, and in a pod)"
