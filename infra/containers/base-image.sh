#!/usr/bin/env bash
# Builds the local base image localhost/tlops-base:bookworm from Debian packages only (no registry): a
# debootstrap --variant=minbase of bookworm plus Python 3.11 (python3, python3-venv), CA certificates, the user
# tools (passwd) and libgomp1 (OpenMP for torch), security updates applied, documentation dropped, then
# `podman import`. The project image builds on it with
#   podman build --build-arg BASE_IMAGE=localhost/tlops-base:bookworm ...
# and so does infra/containers/postgres.Containerfile.
#
#   infra/containers/base-image.sh             # skips when the image already exists
#   infra/containers/base-image.sh --force     # rebuild (or TLOPS_BASE_FORCE=1)
#
# Needs root (debootstrap, chroot) and a Debian mirror (DEBIAN_MIRROR, default http://deb.debian.org/debian).
# Exit codes: 0 built or present; 3 SKIP (not root, no debootstrap or podman); anything else: failure.
set -euo pipefail

IMAGE=${TLOPS_BASE_IMAGE:-localhost/tlops-base:bookworm}
SUITE=bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
INCLUDE=python3,python3-venv,ca-certificates,libgomp1,passwd
FORCE=${TLOPS_BASE_FORCE:-0}
[ "${1:-}" = "--force" ] && FORCE=1

log() { echo "base-image: $*" >&2; }
skip() { log "SKIP: $*"; exit 3; }

[ "$(id -u)" = 0 ] || skip "not root: debootstrap needs root"
command -v podman >/dev/null 2>&1 || skip "no podman (run infra/containers/setup-podman.sh)"
command -v debootstrap >/dev/null 2>&1 || skip "no debootstrap (run infra/containers/setup-podman.sh)"

if [ "$FORCE" != 1 ] && podman image exists "$IMAGE"; then
  log "$IMAGE exists ($(podman image inspect --format '{{.Size}}' "$IMAGE" | numfmt --to=iec)); --force rebuilds it"
  exit 0
fi

work=$(mktemp -d /var/tmp/tlops-base.XXXXXX)
root=$work/rootfs
cleanup() {
  for m in proc dev/pts dev; do mountpoint -q "$root/$m" 2>/dev/null && umount -l "$root/$m"; done
  rm -rf "$work"
}
trap cleanup EXIT

start=$(date +%s)
log "debootstrap $SUITE (minbase + $INCLUDE) from $MIRROR"
timeout 1800 debootstrap --variant=minbase --include="$INCLUDE" "$SUITE" "$root" "$MIRROR" >"$work/debootstrap.log" 2>&1 \
  || { tail -20 "$work/debootstrap.log" >&2; log "debootstrap failed"; exit 1; }

# Slim-image conventions: later apt installs (the PostgreSQL image) skip documentation and translations too,
# and apt keeps no package cache or lists.
cat >"$root/etc/dpkg/dpkg.cfg.d/docker-slim" <<'CFG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
path-exclude /usr/share/lintian/*
CFG
cat >"$root/etc/apt/apt.conf.d/docker-clean" <<'CFG'
APT::Install-Recommends "false";
APT::Install-Suggests "false";
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
CFG
cat >"$root/etc/apt/sources.list" <<SRC
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb $SECURITY_MIRROR $SUITE-security main
SRC

# Security and point-release updates, inside the new root.
mount -t proc proc "$root/proc"
mount --bind /dev "$root/dev"
export DEBIAN_FRONTEND=noninteractive
{ timeout 900 chroot "$root" apt-get update -qq && timeout 900 chroot "$root" apt-get -y -qq upgrade \
    && chroot "$root" apt-get clean; } >"$work/upgrade.log" 2>&1 \
  || { tail -20 "$work/upgrade.log" >&2; log "apt-get upgrade in the new root failed"; exit 1; }
umount -l "$root/dev" "$root/proc"

# What minbase brings that an image does not need.
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* "$root"/var/cache/debconf/*-old \
  "$root"/var/log/* "$root"/tmp/* "$root"/var/tmp/* "$root"/root/.cache
find "$root/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete 2>/dev/null || true
find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete 2>/dev/null || true
rm -rf "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/lintian
find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 -not -name locale.alias -exec rm -rf {} + 2>/dev/null || true
# The standard library's bytecode (Debian's py3compile wrote it at install) stays: containers run read-only, so
# without it every Python process in them compiles json, logging, asyncio, email, ... again at each start.
: >"$root/etc/machine-id"
echo "tlops-base" >"$root/etc/hostname"

tar --numeric-owner --xattrs -C "$root" -c . | podman import --quiet \
  --change 'ENV LANG=C.UTF-8' \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'CMD ["/bin/bash"]' \
  --change "LABEL org.opencontainers.image.title=tlops-base org.opencontainers.image.description=Debian-$SUITE-minbase-with-python3" \
  - "$IMAGE" >/dev/null
size=$(podman image inspect --format '{{.Size}}' "$IMAGE" | numfmt --to=iec)
log "built $IMAGE ($size) in $(( $(date +%s) - start ))s"
podman run --rm --pull=never --network=none "$IMAGE" python3 -c 'import ssl, venv; print("python", __import__("sys").version.split()[0])'
