#!/usr/bin/env bash
# NVlabs/NVAE on CIFAR-10, vanilla and patched, every training step of every process logged
# by `vaepatch run nvae`, ending with the per-variant table of NaN steps and skipped updates
# (AMP's GradScaler skips appear as amp_skips).
#
# Defaults are the NVAE README's CIFAR-10 command (8 GPUs, 400 epochs, --res_dist, --num_nf 1,
# --fast_adamax), seeds 0-2, the paper's six Table 4 variants (vaepatch variants lists all). NVAE starts one process per GPU itself
# (--gpus N becomes --num_process_per_node N). Each run lives in OUT/<variant>-seed<S>/
# (run.json, events.jsonl, and NVAE's own log and checkpoint under nvae/eval-<name>/).
# Re-running the script skips completed runs and continues interrupted ones from NVAE's
# checkpoint (--cont_training; NVAE saves one per epoch).
#
#   run_scripts/nvae_cifar.sh --data ~/cifar10 --out runs/nvae_cifar
#   run_scripts/nvae_cifar.sh --smoke            # CPU, tiny model, bundled images, minutes
#
# --data is the folder holding cifar-10-batches-py/ (from https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz;
# NVAE's torchvision loader downloads it there when the machine is online). Arguments after `--` go
# to train.py and override the defaults. --skip-nonfinite adds VDVAE's rule (skip an update whose
# loss is non-finite) to every run.
set -euo pipefail

usage() { sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; echo
  echo "options: --variants A,B (or 'A;B,ou=0.9x5': ; when a spec has commas) --seeds 0,1,2"
  echo "         --gpus N --epochs E --data DIR --out DIR"
  echo "         --upstream PATH --port BASE --skip-nonfinite --smoke   [-- train.py args]"; }

. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
PORT_BASE=6020
own_option() { [ "$1" = --skip-nonfinite ] && RUN_OPTS+=(--skip-nonfinite); }
parse_options nvae_cifar.sh "$@"

TRAIN_OPTS=(--dataset cifar10)
if [ "$SMOKE" = 1 ]; then
  # NVAE's smallest model on CPU: one epoch of 8 steps (64 images, batch 8), then NVAE's own
  # evaluation (10 importance samples per epoch, 1000 at the end) on 8 test images.
  SEEDS=${SEEDS:-0} GPUS=${GPUS:-1} EPOCHS=${EPOCHS:-1} OUT=${OUT:-nvae-smoke}
  if [ -z "$DATA" ]; then
    DATA=$OUT/data
    [ -f "$DATA/cifar-10-batches-py/test_batch" ] || "$PYTHON" -m vaepatch make-data "$DATA" --for nvae --train 64 --test 8
  fi
  RUN_OPTS+=(--cpu)
  TRAIN_OPTS+=(--batch_size 8 --warmup_epochs 0 --num_channels_enc 4 --num_channels_dec 4 --num_latent_scales 2
    --num_groups_per_scale 2 --num_latent_per_group 2 --num_preprocess_blocks 1 --num_preprocess_cells 1
    --num_postprocess_blocks 1 --num_postprocess_cells 1 --num_mixture_dec 1 --use_se --res_dist)
else
  SEEDS=${SEEDS:-0,1,2} GPUS=${GPUS:-8} EPOCHS=${EPOCHS:-400} OUT=${OUT:-runs/nvae_cifar}
  require_cifar nvae_cifar.sh
  # the NVAE README's CIFAR-10 command
  TRAIN_OPTS+=(--num_channels_enc 128 --num_channels_dec 128 --num_postprocess_cells 2 --num_preprocess_cells 2
    --num_latent_scales 1 --num_latent_per_group 20 --num_cell_per_cond_enc 2 --num_cell_per_cond_dec 2
    --num_preprocess_blocks 1 --num_postprocess_blocks 1 --num_groups_per_scale 30 --batch_size 32
    --weight_decay_norm 1e-2 --num_nf 1 --use_se --res_dist --fast_adamax)
fi
[ -n "$UPSTREAM" ] && RUN_OPTS+=(--upstream "$UPSTREAM")

run_one() {
  local variant=$1 seed=$2 name=$3 run=$4 port=$5
  local ckpt="$run/nvae/eval-$name/checkpoint.pt" CONTINUE=()
  if [ -f "$ckpt" ]; then
    echo "== $name: continuing from $ckpt"
    CONTINUE=(--cont_training)
  elif [ -e "$run" ]; then
    move_aside "$run" "$name"
  fi
  echo "== $name: vaepatch run nvae --variant $variant --out $run (processes: $GPUS)"
  "$PYTHON" -m vaepatch run nvae --variant "$variant" --out "$run" --master-port "$port" "${RUN_OPTS[@]}" -- \
    "${TRAIN_OPTS[@]}" --seed "$seed" --epochs "$EPOCHS" --num_process_per_node "$GPUS" --data "$DATA" \
    --root "$run/nvae" --save "$name" "${CONTINUE[@]}" "${EXTRA[@]}"
}

for_each_run run_one
compare_table
