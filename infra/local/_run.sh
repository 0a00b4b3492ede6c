#!/usr/bin/env bash
# Shared by up.sh, down.sh and status.sh: run `python -m sermtl_localstack <command> ...` in the project's
# locked environment (uv.lock), from the caller's working directory. Without --dir the stack lives in
# <repository>/.localstack, whichever folder the script is called from.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
command="$1"
shift
has_dir=0
for arg in "$@"; do
  case "$arg" in --dir | --dir=*) has_dir=1 ;; esac
done
[ "$has_dir" = 1 ] || set -- --dir "$root/.localstack" "$@"
if command -v uv >/dev/null 2>&1; then uv=(uv); else uv=(python3 -m uv); fi
export MLFLOW_DISABLE_TELEMETRY=true
exec "${uv[@]}" run --frozen --project "$root" python -m sermtl_localstack "$command" "$@"
