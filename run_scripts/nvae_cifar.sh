#!/usr/bin/env bash
# NVlabs/NVAE on CIFAR-10, vanilla and patched, every training step of every process logged
# by `vaepatch run nvae`, ending with the per-variant table of NaN steps and skipped updates
# (AMP's GradScaler skips appear as amp_skips).
#
# Defaults are the NVAE README's CIFAR-10 command (8 GPUs, 400 epochs, --res_dist, --num_nf 1,
# --fast_adamax), seeds 0-2, all six built-in variants. NVAE starts one process per GPU itself
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
  echo "options: --variants A,B --seeds 0,1,2 --gpus N --epochs E --data DIR --out DIR"
  echo "         --upstream PATH --port BASE --skip-nonfinite --smoke   [-- train.py args]"; }

PYTHON=${PYTHON:-python}
VARIANTS="vanilla,upbounded1,explin,vanilla-cst1,upbounded1-cst1,explin-cst1"
SEEDS="" GPUS="" EPOCHS="" DATA="" OUT="" UPSTREAM="" SMOKE=0 PORT_BASE=6020 EXTRA=()
RUN_OPTS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --variants) VARIANTS=$2; shift 2 ;;
    --seeds) SEEDS=$2; shift 2 ;;
    --gpus) GPUS=$2; shift 2 ;;
    --epochs) EPOCHS=$2; shift 2 ;;
    --data) DATA=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --upstream) UPSTREAM=$2; shift 2 ;;
    --port) PORT_BASE=$2; shift 2 ;;
    --skip-nonfinite) RUN_OPTS+=(--skip-nonfinite); shift ;;
    --smoke) SMOKE=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "nvae_cifar.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

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
  if [ -z "$DATA" ] || [ ! -d "$DATA/cifar-10-batches-py" ]; then
    echo "nvae_cifar.sh: --data must be the folder holding cifar-10-batches-py/ (got '${DATA}')." >&2
    echo "  get it: https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz, or try --smoke" >&2
    exit 2
  fi
  # the NVAE README's CIFAR-10 command
  TRAIN_OPTS+=(--num_channels_enc 128 --num_channels_dec 128 --num_postprocess_cells 2 --num_preprocess_cells 2
    --num_latent_scales 1 --num_latent_per_group 20 --num_cell_per_cond_enc 2 --num_cell_per_cond_dec 2
    --num_preprocess_blocks 1 --num_postprocess_blocks 1 --num_groups_per_scale 30 --batch_size 32
    --weight_decay_norm 1e-2 --num_nf 1 --use_se --res_dist --fast_adamax)
fi
[ -n "$UPSTREAM" ] && RUN_OPTS+=(--upstream "$UPSTREAM")

mkdir -p "$OUT"
index=0
IFS=, read -r -a variant_list <<< "$VARIANTS"
IFS=, read -r -a seed_list <<< "$SEEDS"
for variant in "${variant_list[@]}"; do
  for seed in "${seed_list[@]}"; do
    name="$variant-seed$seed"
    run="$OUT/$name"
    port=$((PORT_BASE + index)); index=$((index + 1))
    if [ -f "$run/run.json" ] && grep -q '"status": "completed"' "$run/run.json"; then
      echo "== $name: completed earlier, skipped"; continue
    fi
    ckpt="$run/nvae/eval-$name/checkpoint.pt"
    CONTINUE=()
    if [ -f "$ckpt" ]; then
      echo "== $name: continuing from $ckpt"
      CONTINUE=(--cont_training)
    elif [ -e "$run" ]; then
      aside="$run.interrupted-$(date +%Y%m%d-%H%M%S)"
      echo "== $name: an earlier attempt stopped before its first checkpoint; kept as $aside, starting over"
      mv "$run" "$aside"
    fi
    echo "== $name: vaepatch run nvae --variant $variant --out $run (processes: $GPUS)"
    "$PYTHON" -m vaepatch run nvae --variant "$variant" --out "$run" --master-port "$port" "${RUN_OPTS[@]}" -- \
      "${TRAIN_OPTS[@]}" --seed "$seed" --epochs "$EPOCHS" --num_process_per_node "$GPUS" --data "$DATA" \
      --root "$run/nvae" --save "$name" "${CONTINUE[@]}" "${EXTRA[@]}" \
      || echo "== $name: exited with status $? (its logged steps are kept; re-run to continue)"
  done
done

echo
echo "== NaN steps and skipped updates per variant (from each run's events.jsonl)"
"$PYTHON" -m vaepatch compare "$OUT"
