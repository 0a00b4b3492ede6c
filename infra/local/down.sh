#!/usr/bin/env bash
# Stop every process of the local stack; its data stays in the folder for the next up.sh.
#   infra/local/down.sh [--dir DIR] [--grace SECONDS]
exec "$(dirname "${BASH_SOURCE[0]}")/_run.sh" down "$@"
