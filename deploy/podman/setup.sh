#!/usr/bin/env bash
# Make this machine able to build and run the vae-serve images with podman, with no Docker
# daemon and no image registry (only the Debian and PyPI mirrors):
#   1. podman, runc and mmdebstrap from Debian, if missing (needs root);
#   2. deploy/podman/containers.conf as /etc/containers/containers.conf;
#   3. the Python base image the Dockerfiles start FROM (build arg PYTHON_IMAGE), made with
#      mmdebstrap from the Debian sources apt uses here and imported into podman.
# Idempotent; a second run takes a fraction of a second. Exits 3, with one line, where no
# engine can be had (not root and podman missing): `make image-test` reports that as a skip.
#
# Usage: deploy/podman/setup.sh [--force]      (--force rebuilds the base image)
# Environment: BASE_IMAGE (default localhost/vae-serve-base:bookworm), SUITE (bookworm).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
force=0
if [[ ${1:-} == --force ]]; then force=1; fi
image=${BASE_IMAGE:-localhost/vae-serve-base:bookworm}
suite=${SUITE:-bookworm}
# What deploy/docker/Dockerfile.cpu needs from its base: `python` with venv and ensurepip,
# groupadd/useradd (passwd) and a CA store for pip.
packages=python3,python3-venv,python-is-python3,passwd,ca-certificates

log() { printf '%s podman setup: %s\n' "$(date +%T)" "$*" >&2; }
fail() { echo "deploy/podman/setup.sh: $*" >&2; exit "${2:-1}"; }

missing=()
for tool in podman runc mmdebstrap; do
    command -v "$tool" >/dev/null || missing+=("$tool")
done
if ((${#missing[@]})); then
    if [[ $EUID -ne 0 ]] || ! command -v apt-get >/dev/null; then
        fail "no container engine: ${missing[*]} missing and cannot be installed here (needs root and apt-get)" 3
    fi
    log "installing ${missing[*]} from Debian"
    apt-get update -q >/dev/null
    # With recommends: catatonit is what podman builds its local pod "pause" image from.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q podman runc mmdebstrap >/dev/null \
        || fail "apt-get install podman runc mmdebstrap failed"
fi
[[ $EUID -eq 0 ]] || fail "run as root: the images are built with rootful podman" 3

# containers.conf, its ulimits at or below this shell's hard limits (podman caps nproc at 32768).
nofile=$(ulimit -Hn); nproc=$(ulimit -Hu)
[[ $nofile == unlimited || $nofile -gt 16384 ]] && nofile=16384
[[ $nproc == unlimited || $nproc -gt 16384 ]] && nproc=16384
conf=$(sed -e "s/nofile=16384:16384/nofile=$nofile:$nofile/" \
           -e "s/nproc=16384:16384/nproc=$nproc:$nproc/" "$here/containers.conf")
mkdir -p /etc/containers
if [[ ! -f /etc/containers/containers.conf || $(cat /etc/containers/containers.conf) != "$conf" ]]; then
    if [[ -f /etc/containers/containers.conf && ! -f /etc/containers/containers.conf.orig ]]; then
        cp /etc/containers/containers.conf /etc/containers/containers.conf.orig
    fi
    printf '%s\n' "$conf" >/etc/containers/containers.conf
    log "wrote /etc/containers/containers.conf (nofile $nofile, nproc $nproc)"
fi

if podman image exists "$image" && ((!force)); then
    exit 0
fi

# The Debian sources apt uses here (a local mirror or proxy, signing keys and all).
mirrors=()
for f in /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list; do
    if [[ -s $f ]] && grep -Eq "^[^#]*\\b$suite\\b" "$f"; then mirrors+=("$f"); fi
done
log "building $image: Debian $suite, minbase + $packages (about a minute)"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# A tarball on stdout straight into `podman import`. Merged /usr through mmdebstrap's hook
# (the usrmerge package would pull in perl) and no docs or translations: about 130 MB.
if ! mmdebstrap --variant=minbase --include="$packages" \
        --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
        --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-include=/usr/share/doc/*/copyright' \
        --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/info/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' \
        "$suite" - "${mirrors[@]}" 2>"$work/mmdebstrap.log" \
    | podman import --quiet \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["python3"]' \
        - "$image" >/dev/null; then
    tail -5 "$work/mmdebstrap.log" >&2
    fail "mmdebstrap or podman import failed (the log's last lines above)"
fi
podman run --rm "$image" sh -c 'python -c "import ensurepip, ssl, venv" && command -v useradd >/dev/null' \
    || fail "$image was built, but a container of it does not start or lacks python/useradd"
log "$image ready ($(podman image inspect --format '{{.Size}}' "$image" | numfmt --to=si)B)"
