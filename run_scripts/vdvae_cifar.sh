#!/usr/bin/env bash
# openai/vdvae on CIFAR-10, vanilla and patched, every training step logged by
# `vaepatch run vdvae`, ending with the per-variant table of NaN steps and skipped updates.
#
# Defaults are the setup of Dehaene & Brossard's Table 4: --hps cifar10, 2 GPUs (MPI ranks),
# 300 epochs, seeds 0-2, the paper's six Table 4 variants (vaepatch variants lists all). Each run lives in OUT/<variant>-seed<S>/
# (run.json, events.jsonl, and VDVAE's own logs and checkpoints under vdvae/). Re-running the
# script skips completed runs and resumes interrupted ones from VDVAE's `latest` checkpoint.
#
#   run_scripts/vdvae_cifar.sh --data ~/cifar10 --out runs/vdvae_cifar
#   run_scripts/vdvae_cifar.sh --smoke            # CPU, tiny model, bundled images, minutes
#
# --data is the folder holding cifar-10-batches-py/ (VDVAE's setup_cifar10.sh downloads it from
# https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz). Arguments after `--` go to train.py.
# LAUNCH overrides how ranks start (default: mpiexec -n GPUS), e.g. LAUNCH="srun" under Slurm.
set -euo pipefail

usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; echo
  echo "options: --variants A,B (or 'A;B,ou=0.9x5': ; when a spec has commas) --seeds 0,1,2"
  echo "         --gpus N --epochs E --data DIR --out DIR"
  echo "         --upstream PATH --port BASE --smoke   [-- train.py args]"; }

. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
PORT_BASE=29500
parse_options vdvae_cifar.sh "$@"

TRAIN_OPTS=(--hps cifar10)
if [ "$SMOKE" = 1 ]; then
  # Tiny model on CPU; one epoch of 30 steps (VDVAE holds out 5000 images for validation),
  # then VDVAE's own evaluation on those 5000.
  SEEDS=${SEEDS:-0} GPUS=${GPUS:-1} EPOCHS=${EPOCHS:-1} OUT=${OUT:-vdvae-smoke}
  if [ -z "$DATA" ]; then
    DATA=$OUT/data
    [ -f "$DATA/cifar-10-batches-py/test_batch" ] || "$PYTHON" -m vaepatch make-data "$DATA" --train 5480 --test 100
  fi
  RUN_OPTS+=(--cpu)
  TRAIN_OPTS+=(--width 32 --zdim 8 --n_batch 16 --iters_per_print 10 --iters_per_images 1000000
    --dec_blocks "1x1,4m1,4x1,8m4,8x1,16m8,16x1,32m16,32x1" --enc_blocks "32x1,32d2,16x1,16d2,8x1,8d2,4x1,4d4,1x1")
else
  SEEDS=${SEEDS:-0,1,2} GPUS=${GPUS:-2} EPOCHS=${EPOCHS:-300} OUT=${OUT:-runs/vdvae_cifar}
  require_cifar vdvae_cifar.sh
fi
[ -n "$UPSTREAM" ] && RUN_OPTS+=(--upstream "$UPSTREAM")

if [ -n "${LAUNCH:-}" ]; then
  read -r -a LAUNCHER <<< "$LAUNCH"
elif [ "$GPUS" -gt 1 ]; then
  command -v mpiexec >/dev/null || { echo "vdvae_cifar.sh: --gpus $GPUS needs mpiexec (pip install 'vaepatch[mpi]')" >&2; exit 2; }
  LAUNCHER=(mpiexec -n "$GPUS")
else
  LAUNCHER=()
fi

run_one() {
  local variant=$1 seed=$2 name=$3 run=$4 port=$5
  local ckpt="$run/vdvae/$name/latest" RESTORE=()
  if [ -f "$ckpt-model.th" ]; then
    echo "== $name: resuming from $ckpt"
    RESTORE=(--restore_path "$ckpt-model.th" --restore_ema_path "$ckpt-model-ema.th"
             --restore_optimizer_path "$ckpt-opt.th" --restore_log_path "$ckpt-log.jsonl")
  elif [ -e "$run" ]; then
    move_aside "$run" "$name"
  fi
  echo "== $name: ${LAUNCHER[*]:-} vaepatch run vdvae --variant $variant --out $run"
  "${LAUNCHER[@]}" "$PYTHON" -m vaepatch run vdvae --variant "$variant" --out "$run" "${RUN_OPTS[@]}" -- \
    "${TRAIN_OPTS[@]}" --seed "$seed" --num_epochs "$EPOCHS" --data_root "$DATA" \
    --save_dir "$run/vdvae" --desc "$name" --port "$port" "${RESTORE[@]}" "${EXTRA[@]}"
}

for_each_run run_one
compare_table
