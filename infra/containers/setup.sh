#!/usr/bin/env bash
# Install podman (and buildah, runc, debootstrap for the base image) from Debian's archive, then check that
# it runs with the project's containers.conf. Idempotent: installs nothing when all are present.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
export CONTAINERS_CONF="$here/containers.conf"
missing=()
for tool in podman buildah runc debootstrap; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]} (apt-get)" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        podman buildah runc debootstrap uidmap fuse-overlayfs slirp4netns netavark aardvark-dns >/dev/null
fi
podman info --format '{{.Host.OCIRuntime.Name}} {{.Store.GraphDriverName}} podman {{.Version.Version}}'
