#!/usr/bin/env bash
# Start MLflow server + PostgreSQL + SeaweedFS S3 on 127.0.0.1 (see README.md next to this file).
#   infra/local/up.sh [--dir DIR] [--foreground] [--mlflow-port 5000] [--s3-port 8333] [--pg-port 5432]
# Detached by default: returns once every service answers; then `source .localstack/stack.env`.
exec "$(dirname "${BASH_SOURCE[0]}")/_run.sh" up "$@"
