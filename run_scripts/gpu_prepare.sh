#!/usr/bin/env bash
# Prepare the GPU check for a GPU machine without network: run once, on a machine with network (not in CI).
#
#   run_scripts/gpu_prepare.sh
#
# 1. Downloads into .whl/ (git-ignored: .gitignore's /.whl/) the wheels the GPU machine lacks, for
#    its python 3.12 on manylinux x86-64: mpi4py and mpich (VDVAE's train.py runs under MPI), and
#    vaepatch's own pure-python dependencies missing from that image, GitPython with gitdb and smmap
#    (the clones' commit check). The GPU machine is assumed to have torch, numpy and the rest.
# 2. Copies this machine's git (and its libpcre2-8) into .whl/git/: gpu_check.sh uses it only if the
#    GPU machine has no git of its own (not checked there yet).
# 3. Checks the clones (pinned commit, clean; real folders: a symlink travels only as a link) and that
#    what is to be copied (tracked and untracked-not-ignored files, plus .whl, third_party/vdvae and
#    third_party/nvae) stays under 64 MiB (LIMIT_MIB), then prints the command to run on the GPU machine.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
PINS=(mpi4py==4.1.2 mpich==5.0.2 GitPython==3.2.1 gitdb==4.0.12 smmap==5.0.3)
LIMIT=$((${LIMIT_MIB:-64} * 1024 * 1024))

mkdir -p .whl
for pin in "${PINS[@]}"; do  # one version of each: two stop the whole install there
  name=${pin%%==*}; version=${pin##*==}
  for old in .whl/"$(echo "$name" | tr 'A-Z-' 'a-z_')"-*.whl .whl/"$name"-*.whl; do
    if [ -e "$old" ] && [[ $old != *"-$version-"* ]]; then rm -v "$old"; fi
  done
done
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${PINS[@]}"
echo "gpu_prepare.sh: wheels in .whl/:"; ls -1 .whl/*.whl

if GIT=$(command -v git); then
  mkdir -p .whl/git
  cp "$GIT" .whl/git/git
  pcre=$(ldd "$GIT" | awk '/libpcre2-8/ {print $3}')
  if [ -n "$pcre" ]; then cp -L "$pcre" .whl/git/; fi
  echo "gpu_prepare.sh: fallback git: .whl/git/ ($(.whl/git/git --version))"
fi

status=0
for name in vdvae nvae; do
  if [ -L "third_party/$name" ]; then
    echo "gpu_prepare.sh: third_party/$name is a symlink ($(readlink "third_party/$name")): copied, it stays" \
         "only as a link. Copy a checkout whose third_party/$name is the clone itself." >&2
    status=1
  fi
done
"$PYTHON" -m vaepatch fetch --check || status=1

tree=$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
carried=$(du -cbL .whl third_party/vdvae third_party/nvae | tail -1 | cut -f1)
total=$((tree + carried))
awk -v t="$tree" -v c="$carried" 'BEGIN { m = 1048576; printf "gpu_prepare.sh: to copy: tree %.1f MiB + " \
  "copied with it (.whl, third_party/vdvae, third_party/nvae) %.1f MiB = %.1f MiB\n", t / m, c / m, (t + c) / m }'
if [ "$total" -gt "$LIMIT" ]; then
  echo "gpu_prepare.sh: over ${LIMIT_MIB:-64} MiB to copy" >&2
  status=1
fi
cat <<'EOF'

Copy this checkout, with .whl/, third_party/vdvae and third_party/nvae, to the GPU machine and run
there (the check stops itself at 450 s; docs: contributing, "GPU check"):
  run_scripts/gpu_check.sh --out OUT --work /tmp/vaepatch-gpu-work
EOF
exit $status
