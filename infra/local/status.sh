#!/usr/bin/env bash
# What of the local stack runs. Exit 0: running, 1: degraded, 3: stopped or never started.
#   infra/local/status.sh [--dir DIR] [--json]
exec "$(dirname "${BASH_SOURCE[0]}")/_run.sh" status "$@"
