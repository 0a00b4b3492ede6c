#!/usr/bin/env bash
# Build the project's images with podman: sermtl (CPU), sermtl-cuda (training) and sermtl-mlflow (tracking
# server), tagged as infra/docker/image-tag.sh says, from the Dockerfiles in infra/docker.
#
#   BASE=official  FROM python:3.11.14-slim-bookworm and ghcr.io/astral-sh/uv (a registry is reachable);
#                  uv downloads the locked wheels inside the build.
#   BASE=debian    FROM a base made here with debootstrap (base-image.sh), uv from its PyPI wheel, and the
#                  host's uv download cache as a build volume, offline (`make setup` fills that cache).
#   BASE=auto      official when docker.io answers within 5 s, else debian (the default).
# IMAGES="sermtl sermtl-cuda sermtl-mlflow" chooses which; IMAGE_REPO (default localhost) their repository.
set -euo pipefail
root=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
cd "$root"
export CONTAINERS_CONF="${CONTAINERS_CONF:-$root/infra/containers/containers.conf}"
repo="${IMAGE_REPO:-localhost}"
images="${IMAGES:-sermtl sermtl-cuda sermtl-mlflow}"
base="${BASE:-auto}"
uv_version=$(sed -n 's#.*ghcr.io/astral-sh/uv:\([0-9.]*\).*#\1#p' infra/docker/Dockerfile | head -n 1)
if [ "$base" = auto ]; then
    if curl -s -o /dev/null -m 5 https://registry-1.docker.io/v2/; then base=official; else base=debian; fi
fi
tag=$(infra/docker/image-tag.sh)
version=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -n 1)
args=(--build-arg VERSION="$version" --build-arg REVISION="$(git rev-parse HEAD)"
      --build-arg SOURCE="$(git remote get-url origin 2>/dev/null || true)")
if [ "$base" = debian ]; then
    python_image=$(infra/containers/base-image.sh)
    uv_image="localhost/sermtl-uv:$uv_version"
    if ! podman image exists "$uv_image"; then
        work=$(mktemp -d)
        python3 -m pip download --quiet --no-deps --only-binary :all: --platform manylinux_2_17_x86_64 \
            --python-version 3.11 -d "$work" "uv==$uv_version"
        (cd "$work" && python3 -m zipfile -e uv-*.whl wheel && install -m 0755 wheel/uv-*.data/scripts/uv ./uv)
        tar -C "$work" -c uv | podman import - "$uv_image" >/dev/null
        rm -rf "$work"
    fi
    cache=$( (command -v uv >/dev/null && uv cache dir) || python3 -m uv cache dir)
    args+=(--build-arg PYTHON_IMAGE="$python_image" --build-arg UV_IMAGE="$uv_image"
           --build-arg UV_CACHE_DIR=/uv-cache --build-arg UV_OFFLINE=true
           --volume "$cache:/uv-cache")
fi
echo "images: base $base, tag $tag" >&2
for image in $images; do
    case "$image" in
        # No network where uv installs from the host's cache; the CUDA image's apt-get (gcc for triton) and
        # the MLflow server's own lock need the package archives.
        sermtl) file=infra/docker/Dockerfile; name="$repo/sermtl:$tag"; net=(--network none) ;;
        sermtl-cuda) file=infra/docker/Dockerfile.cuda; name="$repo/sermtl:$tag-cuda"; net=(--network host) ;;
        # The MLflow server's own lock is not in the host's cache: uv downloads it, through the machine's CA.
        sermtl-mlflow) file=infra/docker/Dockerfile.mlflow; name="$repo/sermtl-mlflow:$tag"
            net=(--network host --build-arg UV_OFFLINE=false
                 --secret "id=ca_bundle,src=${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}") ;;
        *) echo "build-images: unknown image $image" >&2; exit 2 ;;
    esac
    started=$(date +%s)
    [ "$base" = debian ] || net=()
    log="artifacts/images/$image.log"
    mkdir -p artifacts/images
    if ! podman build --layers "${args[@]}" "${net[@]}" -f "$file" -t "$name" . >"$log" 2>&1; then
        tail -n 20 "$log" >&2
        echo "build-images: $image failed; the whole log: $log" >&2
        exit 1
    fi
    size=$(podman image inspect --format '{{.Size}}' "$name")
    echo "$name built in $(( $(date +%s) - started )) s, $(( size / 1000000 )) MB"
done
