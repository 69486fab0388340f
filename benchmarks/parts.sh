# Sourced by benchmarks/gpu.sh and gpu_train.sh (from the checkout's root). PY is the interpreter (PYTHON, else
# python3, else python); it stops with one line where there is no CUDA device, and prints the device and the date.
# Then `part NAME HEADING COMMAND...` runs one measurement under `timeout PART_SECONDS` (none if unset), prints its
# output as it comes and, with LOG_DIR set, keeps it in $LOG_DIR/NAME.log. A part that fails or runs out of time is
# reported in one line and does not stop the others.
PY=${PY:-${PYTHON:-$(command -v python3 || command -v python)}}
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else '$0: no CUDA device')" || exit 1
"$PY" -c "import torch; p = torch.cuda.get_device_properties(0); print(f'{p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}')"
date -u
export PYTHONUNBUFFERED=1  # a part cut by its timeout keeps what it printed
[[ -n "${LOG_DIR:-}" ]] && mkdir -p "$LOG_DIR"

part() {
  local name=$1 heading=$2
  shift 2
  echo "== $heading"
  local limit=()
  [[ -n "${PART_SECONDS:-}" ]] && limit=(timeout "$PART_SECONDS")
  "${limit[@]}" "$@" 2>&1 | if [[ -n "${LOG_DIR:-}" ]]; then tee "$LOG_DIR/$name.log"; else cat; fi
  local rc=${PIPESTATUS[0]}
  if [[ $rc == 124 ]]; then echo "== ($name: stopped at its ${PART_SECONDS} s)"; elif [[ $rc != 0 ]]; then echo "== ($name: exit status $rc)"; fi
  return 0
}
