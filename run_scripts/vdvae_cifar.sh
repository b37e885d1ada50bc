#!/usr/bin/env bash
# openai/vdvae on CIFAR-10, vanilla and patched, every training step logged by
# `vaepatch run vdvae`, ending with the per-variant table of NaN steps and skipped updates.
#
# Defaults are the setup of Dehaene & Brossard's Table 4: --hps cifar10, 2 GPUs (MPI ranks),
# 300 epochs, seeds 0-2, all six built-in variants. Each run lives in OUT/<variant>-seed<S>/
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
  echo "options: --variants A,B --seeds 0,1,2 --gpus N --epochs E --data DIR --out DIR"
  echo "         --upstream PATH --port BASE --smoke   [-- train.py args]"; }

PYTHON=${PYTHON:-python}
VARIANTS="vanilla,upbounded1,explin,vanilla-cst1,upbounded1-cst1,explin-cst1"
SEEDS="" GPUS="" EPOCHS="" DATA="" OUT="" UPSTREAM="" SMOKE=0 PORT_BASE=29500 EXTRA=()
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
    --smoke) SMOKE=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "vdvae_cifar.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

RUN_OPTS=()
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
  if [ -z "$DATA" ] || [ ! -d "$DATA/cifar-10-batches-py" ]; then
    echo "vdvae_cifar.sh: --data must be the folder holding cifar-10-batches-py/ (got '${DATA}')." >&2
    echo "  get it: https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz, or try --smoke" >&2
    exit 2
  fi
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
    ckpt="$run/vdvae/$name/latest"
    RESTORE=()
    if [ -f "$ckpt-model.th" ]; then
      echo "== $name: resuming from $ckpt"
      RESTORE=(--restore_path "$ckpt-model.th" --restore_ema_path "$ckpt-model-ema.th"
               --restore_optimizer_path "$ckpt-opt.th" --restore_log_path "$ckpt-log.jsonl")
    elif [ -e "$run" ]; then
      aside="$run.interrupted-$(date +%Y%m%d-%H%M%S)"
      echo "== $name: an earlier attempt stopped before its first checkpoint; kept as $aside, starting over"
      mv "$run" "$aside"
    fi
    echo "== $name: ${LAUNCHER[*]:-} vaepatch run vdvae --variant $variant --out $run"
    "${LAUNCHER[@]}" "$PYTHON" -m vaepatch run vdvae --variant "$variant" --out "$run" "${RUN_OPTS[@]}" -- \
      "${TRAIN_OPTS[@]}" --seed "$seed" --num_epochs "$EPOCHS" --data_root "$DATA" \
      --save_dir "$run/vdvae" --desc "$name" --port "$port" "${RESTORE[@]}" "${EXTRA[@]}" \
      || echo "== $name: exited with status $? (its logged steps are kept; re-run to resume)"
  done
done

echo
echo "== NaN steps and skipped updates per variant (from each run's events.jsonl)"
"$PYTHON" -m vaepatch compare "$OUT"
