#!/usr/bin/env bash
# The Python base image where no container registry is reachable: Debian bookworm (minbase) with its
# python3 (3.11), venv and CA certificates, made with debootstrap from the Debian archive apt uses, and
# imported into podman. Skipped when the image exists (`--force` rebuilds it).
# Usage: infra/containers/base-image.sh [--force]   -> prints the image name
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
export CONTAINERS_CONF="${CONTAINERS_CONF:-$here/containers.conf}"
image="${SERMTL_BASE_IMAGE:-localhost/sermtl-base:bookworm-python3.11}"
if [ "${1:-}" != "--force" ] && podman image exists "$image"; then
    echo "$image"
    exit 0
fi
mirror=$(awk '/^URIs:/ && $2 !~ /security/ { print $2; exit }' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
mirror="${DEBIAN_MIRROR:-${mirror:-http://deb.debian.org/debian}}"
root=$(mktemp -d /var/tmp/sermtl-base.XXXXXX)
trap 'rm -rf "$root"' EXIT
echo "base-image: debootstrap bookworm from $mirror" >&2
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$root" "$mirror" >/dev/null
# No apt lists, caches or docs in the image.
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* "$root"/usr/share/doc/* "$root"/usr/share/man/*
tar -C "$root" -c . | podman import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["python3"]' - "$image" >/dev/null
echo "$image"
