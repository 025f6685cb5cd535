#!/usr/bin/env bash
# Every owed GPU figure in one command (benchmarks/gpu_proof.py), from a clean checkout on a bare
# CUDA machine with PyTorch and no network:
#     benchmarks/gpu_proof.sh OUT_DIR [--budget-s 480] [--dry-run] [...]
# Python packages missing there can travel with the tree as wheels in .whl/ (or $GPU_PROOF_WHEELS);
# they are installed offline into a private folder first. Nothing is downloaded.
# $PYTHON chooses the interpreter (default: the repository's .venv when there is one, else python3).
set -u
root=$(cd "$(dirname "$0")/.." && pwd) || exit 1
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$root/.venv/bin/python" ]; then PYTHON=$root/.venv/bin/python; else PYTHON=python3; fi
fi
path=$root  # first: the repository's packages (utils, models) must win over installed ones
wheels=${GPU_PROOF_WHEELS:-$root/.whl}
if compgen -G "$wheels/*.whl" > /dev/null; then
  site=${GPU_PROOF_SITE:-/tmp/gpu-proof-site}
  if "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$site" "$wheels"/*.whl; then
    path=$path:$site
  else  # the steps that need a missing package say so in the report; the others still run
    echo "gpu_proof.sh: installing the wheels in $wheels failed; going on without them" >&2
  fi
fi
export PYTHONPATH=$path${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
exec "$PYTHON" -m benchmarks.gpu_proof "$@"
