#!/usr/bin/env bash
# A multi-node Ray cluster on this machine: a head and N worker nodes, each its own `ray start` with free ports,
# dashboard on 127.0.0.1, token auth on (see `mirasol cluster --help` and docs/CLUSTER.md).
#   cluster/local.sh up [--workers N] [--worker-cpus C] ...
#   cluster/local.sh status
#   cluster/local.sh down
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
mirasol="${MIRASOL:-$here/.venv/bin/mirasol}"
[ -x "$mirasol" ] || mirasol="$(command -v mirasol || true)"
if [ -z "$mirasol" ]; then
    echo "local.sh: the mirasol command was not found (run make venv, or pip install -e .)" >&2
    exit 2
fi
case "${1:-}" in
    up|down|status) exec "$mirasol" cluster "$@" ;;
    *) echo "usage: cluster/local.sh up|down|status [options]   (mirasol cluster --help)" >&2; exit 2 ;;
esac
