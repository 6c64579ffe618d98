#!/usr/bin/env bash
# Build the keygate container image with buildah (no Docker engine, no registry needed) and check it.
#
# Usage (as root): scripts/build-image.sh
#
#   1. installs buildah and debootstrap with apt-get if they are missing;
#   2. makes a Debian bookworm base image from Debian's own packages (debootstrap --variant=minbase)
#      and tags it docker.io/library/debian:bookworm-slim, the name the Dockerfile asks for.  The
#      rootfs tarball is cached in $KEYGATE_IMAGE_CACHE (default /var/tmp/keygate-image-cache) and the
#      base image is kept in buildah's storage; both are made once (KEYGATE_REBUILD_BASE=1 remakes them);
#   3. builds the Dockerfile:  buildah --storage-driver vfs bud --pull=never --isolation chroot -t keygate .
#      (plus --layers --force-rm --format docker and the pip-ca build secret; see below);
#   4. runs `keygate --help` and `keygate demo --records 50 --directory /tmp/demo` in a container of
#      the image (the demo's gateway listens on 127.0.0.1 only) and prints PASS or FAIL.
#
# Exit status: 0 when the image was built and every check passed, non-zero otherwise.
# Environment: KEYGATE_IMAGE (default keygate), KEYGATE_IMAGE_CACHE, KEYGATE_REBUILD_BASE,
#              KEYGATE_DEBIAN_MIRROR (default http://deb.debian.org/debian),
#              KEYGATE_BUILD_CA_BUNDLE (CA bundle pip trusts during the build; default the host's
#              /etc/ssl/certs/ca-certificates.crt; passed as a build secret, not stored in the image).
# This takes minutes (the first run longest); it is not part of the default test run.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd -P)
image=${KEYGATE_IMAGE:-keygate}
cache=${KEYGATE_IMAGE_CACHE:-/var/tmp/keygate-image-cache}
mirror=${KEYGATE_DEBIAN_MIRROR:-http://deb.debian.org/debian}
base=docker.io/library/debian:bookworm-slim
bah=(buildah --storage-driver vfs)

log() { printf '[build-image %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "FAIL: $*"; exit 1; }
t0=$SECONDS

[ "$(id -u)" -eq 0 ] || die "run as root (buildah with the vfs driver and chroot isolation, debootstrap)"

# --- 1. tools ---------------------------------------------------------------------------------------
missing=()
command -v buildah >/dev/null 2>&1 || missing+=(buildah)
command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
if [ "${#missing[@]}" -gt 0 ]; then
  log "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
log "$(buildah --version)"

mkdir -p "$cache"
exec 9>"$cache/lock"
flock 9 || die "cannot lock $cache/lock"

# --- 2. base image ----------------------------------------------------------------------------------
rootfs_tar=$cache/bookworm-minbase.tar
if [ "${KEYGATE_REBUILD_BASE:-0}" = 1 ]; then
  log "KEYGATE_REBUILD_BASE=1: remaking the base rootfs and image"
  rm -f "$rootfs_tar"
  "${bah[@]}" rmi "$base" >/dev/null 2>&1 || true
fi
if [ ! -s "$rootfs_tar" ]; then
  log "debootstrap bookworm minbase into $cache (about 30 s)"
  work=$(mktemp -d "$cache/rootfs.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  debootstrap --variant=minbase bookworm "$work/rootfs" "$mirror" >"$cache/debootstrap.log" 2>&1 \
    || die "debootstrap failed; see $cache/debootstrap.log"
  # Package sources like the official image: the release, its updates and the security archive.
  rm -f "$work/rootfs/etc/apt/sources.list"
  cat >"$work/rootfs/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $mirror
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  chroot "$work/rootfs" apt-get clean
  rm -rf "$work/rootfs/var/lib/apt/lists/"* "$work/rootfs/var/log/"*.log "$work/rootfs/var/cache/debconf/"*-old
  tar -C "$work/rootfs" --numeric-owner -cf "$rootfs_tar.tmp" .
  mv "$rootfs_tar.tmp" "$rootfs_tar"
  rm -rf "$work"
  trap - EXIT
  "${bah[@]}" rmi "$base" >/dev/null 2>&1 || true  # a new rootfs means a new base image
else
  log "reusing $rootfs_tar"
fi
if ! "${bah[@]}" inspect --type image "$base" >/dev/null 2>&1; then
  log "making the base image $base from the rootfs"
  ctx=$(mktemp -d "$cache/base-ctx.XXXXXX")
  ln "$rootfs_tar" "$ctx/rootfs.tar" 2>/dev/null || cp "$rootfs_tar" "$ctx/rootfs.tar"
  printf 'FROM scratch\nADD rootfs.tar /\nCMD ["bash"]\n' >"$ctx/Dockerfile"
  "${bah[@]}" bud --quiet --isolation chroot -t "$base" "$ctx" >/dev/null || { rm -rf "$ctx"; die "base image build failed"; }
  rm -rf "$ctx"
else
  log "reusing the base image $base"
fi

# --- 3. the keygate image ---------------------------------------------------------------------------
old_id=$("${bah[@]}" images -q --no-trunc "localhost/$image:latest" 2>/dev/null || true)
log "building $image from $repo"
t_build=$SECONDS
# --layers keeps intermediate images so unchanged steps are reused (--force-rm: no working container
# is left behind when a step fails); --format docker keeps HEALTHCHECK.
# pip inside the build trusts this host's CA bundle (build secret pip-ca, never stored in the image):
# outgoing HTTPS here goes through a TLS-inspecting proxy whose CA only the host bundle has.
secret=()
ca_bundle=${KEYGATE_BUILD_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
if [ -s "$ca_bundle" ]; then secret=(--secret "id=pip-ca,src=$ca_bundle"); fi
"${bah[@]}" bud --pull=never --isolation chroot --layers --force-rm --format docker "${secret[@]}" -t "$image" "$repo" \
  || die "buildah bud failed"
new_id=$("${bah[@]}" images -q --no-trunc "localhost/$image:latest")
log "built localhost/$image:latest ($new_id) in $((SECONDS - t_build)) s"
if [ -n "$old_id" ] && [ "$old_id" != "$new_id" ]; then
  "${bah[@]}" rmi "$old_id" >/dev/null 2>&1 || true  # the previous build, now untagged
fi

# --- 4. verify ---------------------------------------------------------------------------------------
ctr=$("${bah[@]}" from --pull=never "localhost/$image:latest")
trap '"${bah[@]}" rm "$ctr" >/dev/null 2>&1 || true' EXIT
run() { "${bah[@]}" run --isolation chroot "$ctr" -- "$@"; }

failures=0
check() {  # check NAME COMMAND...: run a command in the container, report PASS or FAIL
  local name=$1; shift
  log "check: $name"
  if run "$@"; then
    echo "PASS  $name"
  else
    echo "FAIL  $name (exit $?)"
    failures=$((failures + 1))
  fi
}
check "runs as the unprivileged user keygate" sh -c '[ "$(id -un)" = keygate ] && [ "$(id -u)" != 0 ]'
check "data dir /var/lib/keygate is writable" sh -c 'touch "$KEYGATE_DATA_DIR/.w" && rm "$KEYGATE_DATA_DIR/.w"'
check "policies and SoftHSM module present" sh -c 'ls "$KEYGATE_POLICIES_DIR"/*.toml >/dev/null && test -f /usr/lib/softhsm/libsofthsm2.so'
check "keygate --help" keygate --help
check "every cloud KMS adapter and its SDK import" python -c 'import importlib; from keygate.providers import ADAPTERS; [getattr(importlib.import_module(m), c) for m, c in ADAPTERS.values()]'
check "residency policy present" sh -c 'test -f "$KEYGATE_POLICIES_DIR/residency.toml"'
check "keygate demo --records 50" keygate demo --records 50 --directory /tmp/demo

echo "image localhost/$image:latest; total $((SECONDS - t0)) s"
if [ "$failures" -ne 0 ]; then
  echo "FAIL: $failures check(s) failed"
  exit 1
fi
echo "PASS: image built and verified"
