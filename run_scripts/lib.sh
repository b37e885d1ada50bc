# Shared by vdvae_cifar.sh and nvae_cifar.sh (sourced, not run): their options, the
# variants x seeds loop that skips completed runs, and the closing comparison table.

PYTHON=${PYTHON:-python}
VARIANTS="vanilla,upbounded1,explin,vanilla-cst1,upbounded1-cst1,explin-cst1"
SEEDS="" GPUS="" EPOCHS="" DATA="" OUT="" UPSTREAM="" SMOKE=0 EXTRA=() RUN_OPTS=()

# parse_options SCRIPT "$@": the common options; a script's own flags go through its
# `own_option FLAG` function (returns 0 when it took the flag). Sets the variables above.
parse_options() {
  local script=$1; shift
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
      *) if declare -F own_option >/dev/null && own_option "$1"; then shift
         else echo "$script: unknown option $1 (see --help)" >&2; exit 2; fi ;;
    esac
  done
}

# require_cifar SCRIPT: --data must hold cifar-10-batches-py/ (full runs; --smoke makes its own).
require_cifar() {
  if [ -z "$DATA" ] || [ ! -d "$DATA/cifar-10-batches-py" ]; then
    echo "$1: --data must be the folder holding cifar-10-batches-py/ (got '${DATA}')." >&2
    echo "  get it: https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz, or try --smoke" >&2
    exit 2
  fi
}

# for_each_run RUN_ONE: calls `RUN_ONE variant seed name run_dir port` for every (variant, seed)
# whose run has not completed; each run gets its own port (PORT_BASE + index).
for_each_run() {
  local run_one=$1 index=0 variant seed name run port
  mkdir -p "$OUT"
  if [[ $VARIANTS == *";"* ]]; then  # ';' separates variants whose specs have commas (upbounded1,ou=0.9x5)
    IFS=';' read -r -a variant_list <<< "$VARIANTS"
  else
    IFS=, read -r -a variant_list <<< "$VARIANTS"
  fi
  IFS=, read -r -a seed_list <<< "$SEEDS"
  for variant in "${variant_list[@]}"; do
    for seed in "${seed_list[@]}"; do
      name="$variant-seed$seed"
      run="$OUT/$name"
      port=$((PORT_BASE + index)); index=$((index + 1))
      if [ -f "$run/run.json" ] && grep -q '"status": "completed"' "$run/run.json"; then
        echo "== $name: completed earlier, skipped"; continue
      fi
      "$run_one" "$variant" "$seed" "$name" "$run" "$port" \
        || echo "== $name: exited with status $? (its logged steps are kept; re-run to resume)"
    done
  done
}

# move_aside RUN NAME: an attempt that died before its first checkpoint cannot be resumed.
move_aside() {
  local aside
  aside="$1.interrupted-$(date +%Y%m%d-%H%M%S)"
  echo "== $2: an earlier attempt stopped before its first checkpoint; kept as $aside, starting over"
  mv "$1" "$aside"
}

compare_table() {
  echo
  echo "== NaN steps and skipped updates per variant (from each run's events.jsonl)"
  "$PYTHON" -m vaepatch compare "$OUT"
}
