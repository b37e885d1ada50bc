#!/usr/bin/env bash
# The GPU check: `vaepatch bench gpu` (VDVAE step time eager and fused, NVAE's AMP skips, the
# launchers' CUDA path, OU's cost), after setting up what the GPU machine lacks. At most
# --budget-s (default 450 s) on one H100/H200; writes OUT/gpu_check.json, gpu_check.md and
# gpu_check_runs.tar.gz as it goes, so a run cut short keeps what it measured.
#
#   run_scripts/gpu_check.sh --out "$OUT" --work /tmp/vaepatch-gpu-work    # on the GPU machine
#   run_scripts/gpu_check.sh --dry-run --out gpu-check-dry                 # a CPU: tiny sizes, < 2 minutes
#
# For a GPU machine without network, run_scripts/gpu_prepare.sh (once, with network) puts the wheels it needs
# in .whl/ (mpi4py, mpich, GitPython, gitdb, smmap for python 3.12), which this script installs
# into a private prefix first (not with --dry-run or --no-wheels), and a git binary in .whl/git/,
# used only where the machine has no git. Copy the clones (third_party/vdvae, third_party/nvae) with
# the checkout. Every other argument goes to `vaepatch bench gpu` (its --help lists them).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$PWD
PYTHON=${PYTHON:-python3}

WHEELS=1 ARGS=()
for a in "$@"; do
  case "$a" in
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; echo
               exec "$PYTHON" -m vaepatch bench gpu --help ;;
    --no-wheels) WHEELS=0; continue ;;
    --dry-run) WHEELS=0 ;;
  esac
  ARGS+=("$a")
done

if [ "$WHEELS" = 1 ] && compgen -G ".whl/*.whl" >/dev/null; then
  PREFIX=${VAEPATCH_GPU_PREFIX:-/tmp/vaepatch-gpu-prefix}
  # --ignore-installed: the image may hold its own mpi4py (built against an MPI it may lack)
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --ignore-installed \
      --prefix "$PREFIX" .whl/*.whl || { echo "gpu_check.sh: installing .whl/*.whl failed" >&2; exit 2; }
  marker=$(find "$PREFIX" -path '*-packages/mpi4py/__init__.py' | head -1)
  [ -n "$marker" ] || { echo "gpu_check.sh: mpi4py not found under $PREFIX after the install" >&2; exit 2; }
  export PYTHONPATH="$(dirname "$(dirname "$marker")")${PYTHONPATH:+:$PYTHONPATH}"
  export PATH="$PREFIX/bin:$PATH"                                     # mpiexec (mpich's hydra)
  export LD_LIBRARY_PATH="$PREFIX/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"  # libmpi.so.12, for mpi4py
  echo "gpu_check.sh: installed $(ls .whl/*.whl | wc -l) prepared wheels into $PREFIX"
fi
if ! command -v git >/dev/null && [ -x .whl/git/git ]; then  # last: the machine's own libraries win
  export PATH="$PATH:$REPO/.whl/git" LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$REPO/.whl/git"
  echo "gpu_check.sh: no git on this machine; using the prepared .whl/git/git"
fi
# Copied clones may arrive with another owner or without their file modes: git then refuses the
# repository ("dubious ownership") or calls every script modified. Neither changes a file's content,
# which is what vaepatch verifies. Set for this check's processes only.
export GIT_CONFIG_COUNT=2 GIT_CONFIG_KEY_0=safe.directory GIT_CONFIG_VALUE_0='*' \
       GIT_CONFIG_KEY_1=core.fileMode GIT_CONFIG_VALUE_1=false
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$PYTHON" -m vaepatch bench gpu "${ARGS[@]}"
