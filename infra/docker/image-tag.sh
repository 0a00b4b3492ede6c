#!/usr/bin/env sh
# Print the image tag of the current checkout: <version>-<shortsha>[-dirty]
#   version   [project].version of pyproject.toml ("+" of a local version becomes "-": tags allow [A-Za-z0-9_.-])
#   shortsha  git rev-parse --short HEAD
#   -dirty    when tracked files differ from HEAD (untracked files do not count, as in sermtl's MLflow tags)
# Usage: TAG=$(infra/docker/image-tag.sh)
set -eu

root=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
version=$(awk '
    /^\[/ { in_project = ($0 == "[project]") }
    in_project && /^version[[:space:]]*=/ { sub(/^[^"]*"/, ""); sub(/".*$/, ""); print; exit }
' "$root/pyproject.toml")
if [ -z "$version" ]; then
    echo "image-tag.sh: no [project] version in $root/pyproject.toml" >&2
    exit 1
fi
sha=$(git -C "$root" rev-parse --short HEAD)
tag="$(printf '%s' "$version" | tr '+' '-')-$sha"
if [ -n "$(git -C "$root" status --porcelain --untracked-files=no)" ]; then
    tag="$tag-dirty"
fi
printf '%s\n' "$tag"
