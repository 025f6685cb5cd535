#!/usr/bin/env bash
# Every owed GPU figure in one command (benchmarks/gpu_proof.py), from a clean checkout on a bare
# CUDA machine with PyTorch and no network:
#     benchmarks/gpu_proof.sh OUT_DIR [--budget-s 480] [--dry-run] [...]
# Python packages missing there can travel with the tree as wheels in .whl/ (or $GPU_PROOF_WHEELS);
# they are installed offline into a private folder first. Nothing is downloaded.
# $PYTHON chooses the interpreter (default: .venv/bin/python when there is one, else python3).
set -u
cd "$(dirname "$0")/.." || exit 1
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
wheels=${GPU_PROOF_WHEELS:-.whl}
if compgen -G "$wheels/*.whl" > /dev/null; then
  site=${GPU_PROOF_SITE:-/tmp/gpu-proof-site}
  if "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$site" "$wheels"/*.whl; then
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  else  # the steps that need a missing package say so in the report; the others still run
    echo "gpu_proof.sh: installing the wheels in $wheels failed; going on without them" >&2
  fi
fi
export PYTHONUNBUFFERED=1
exec "$PYTHON" -m benchmarks.gpu_proof "$@"
