#!/usr/bin/env bash
# Creates .venv-lucidrains: lucidrains' mirasol-pytorch 0.0.16, the peer that `python -m
# benchmarks.lucidrains` times against ours. A separate venv because it needs x-transformers<1.29
# (it fails to build against current x-transformers, FIELD_NOTES); x-transformers 1.28 imports `packaging`
# without declaring it.
#
#   bash benchmarks/lucidrains_venv.sh [VENV_DIR]
#
# torch is pinned first, alone: otherwise pip resolves mirasol-pytorch's bare `torch` requirement to the
# multi-GB CUDA build.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${1:-$here/.venv-lucidrains}"
python="${PYTHON:-python3}"
"$python" -m venv "$venv"
"$venv/bin/pip" install --quiet --upgrade pip
"$venv/bin/pip" install --quiet 'torch==2.13.0'
"$venv/bin/pip" install --quiet 'torch==2.13.0' 'mirasol-pytorch==0.0.16' 'x-transformers<1.29' packaging
"$venv/bin/python" -c "import mirasol_pytorch, x_transformers, torch; print('ok', torch.__version__)"
