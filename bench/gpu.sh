#!/usr/bin/env bash
# The GPU check (bench/README.md, "GPU check"): run once where a GPU is lent.
#  1. bench/train with the paper profile on the device: throughput (audio-s/s), share of bf16 peak, peak memory;
#  2. one fold of mtl_attention with the paper profile on an IEMOCAP-scale synthetic corpus: UAR, s/epoch.
# Writes train.json, fold.json and the logs to $RESULTS (default bench/.cache/gpu; on the device machine $OUT).
#
#   bench/gpu.sh                                   # cuda, 10,039 utterances, 50 steps x 5 repeats, 5 epochs
#   DEVICE=cpu UTTERANCES=60 STEPS=2 REPEATS=1 EPOCHS=1 BENCH_UTTERANCES=60 bench/gpu.sh   # the CPU smoke run
#
# Python: $PYTHON, else .venv/bin/python, else python3 (the device machine's, which has torch but not
# soundfile: carry its wheels, see bench/README.md). sermtl is imported from src/, not installed.
set -euo pipefail
cd "$(dirname "$0")/.."

DEVICE=${DEVICE:-cuda}
UTTERANCES=${UTTERANCES:-10039}        # the synthetic corpus of the fold run (IEMOCAP: 10,039)
BENCH_UTTERANCES=${BENCH_UTTERANCES:-2000}
STEPS=${STEPS:-50}
REPEATS=${REPEATS:-5}
EPOCHS=${EPOCHS:-5}                    # of the fold run; the paper profile allows 30 with early stopping
PEAK_TFLOPS=${PEAK_TFLOPS:-989}        # bf16 dense peak of an H100/H200 SXM
RESULTS=${RESULTS:-${OUT:-bench/.cache/gpu}}
WORK=${WORK:-bench/.cache/gpu-work}
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$RESULTS" "$WORK"
log() { printf '[gpu.sh %s] %s\n' "$(date +%H:%M:%S)" "$*" | tee -a "$RESULTS/gpu.log"; }

missing=$("$PYTHON" - <<'EOF'
import importlib.util
need = ["torch", "numpy", "pandas", "pyarrow", "scipy", "soundfile", "typer", "yaml", "tqdm"]
print(" ".join(n for n in need if importlib.util.find_spec(n) is None))
EOF
)
if [[ -n "$missing" ]]; then
  log "missing Python packages: $missing (carry them as wheels: bench/README.md, GPU check)"
  exit 2
fi
"$PYTHON" - <<EOF | tee -a "$RESULTS/gpu.log"
import torch
print("torch", torch.__version__, "| device $DEVICE |",
      torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device")
if "$DEVICE" == "cuda" and not torch.cuda.is_available():
    raise SystemExit("DEVICE=cuda but torch sees no CUDA device")
EOF

log "1/2 bench/train: paper profile, $STEPS steps x $REPEATS repeats on $DEVICE"
"$PYTHON" bench/train/run.py --profile paper --device "$DEVICE" --steps "$STEPS" --repeats "$REPEATS" \
  --utterances "$BENCH_UTTERANCES" --peak-tflops "$PEAK_TFLOPS" 2>&1 | tee "$RESULTS/train.log"
"$PYTHON" - "$RESULTS/train.log" "$RESULTS/train.json" <<'EOF'
import json, sys
text = open(sys.argv[1]).read()
start = text.rindex("\n{") + 1 if "\n{" in text else text.index("{")
json.dump(json.loads(text[start:]), open(sys.argv[2], "w"), indent=2)
EOF

log "2/2 one fold of mtl_attention, paper profile, $UTTERANCES utterances, at most $EPOCHS epochs"
corpus="$WORK/synth_$UTTERANCES/IEMOCAP_full_release"
store="$WORK/synth_$UTTERANCES/store"
run_dir="$WORK/synth_$UTTERANCES/run_${DEVICE}_e$EPOCHS"
params="$WORK/params_paper_e$EPOCHS.yaml"
"$PYTHON" - "$params" "$EPOCHS" "$DEVICE" <<'EOF'
import sys, yaml
raw = yaml.safe_load(open("params.yaml"))
raw["profile"] = "paper"
raw["train"]["max_epochs"] = int(sys.argv[2])
raw["train"]["device"] = sys.argv[3]
raw["train"]["seeds"] = [0]  # one network: the figure is time per epoch of one training run
yaml.safe_dump(raw, open(sys.argv[1], "w"), sort_keys=False)
EOF
sermtl() { "$PYTHON" -m sermtl.cli "$@"; }
started=$(date +%s)
sermtl synth --out "$corpus" --utterances "$UTTERANCES" --seed 0 --params "$params" 2>&1 | tee -a "$RESULTS/gpu.log"
sermtl ingest --source "$corpus" --out "$store" --params "$params" 2>&1 | tee -a "$RESULTS/gpu.log"
prepared=$(date +%s)
sermtl train --system mtl_attention --fold 0 --store "$store" --out "$run_dir" --params "$params" \
  --device "$DEVICE" --no-resume 2>&1 | tee "$RESULTS/fold.log"
finished=$(date +%s)
"$PYTHON" - "$run_dir" "$RESULTS/fold.json" "$((prepared - started))" "$((finished - prepared))" <<'EOF'
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
metrics = json.loads((run / "metrics.json").read_text())
history = json.loads((run / "history.json").read_text())
epochs = history if isinstance(history, list) else history.get("epochs", [])
seconds = [e["seconds"] for e in epochs if isinstance(e, dict) and "seconds" in e]
summary = {
    "device": metrics.get("device"),
    "test_session": metrics.get("test_session"),
    "uar": {d: v["uar"] for d, v in metrics["evaluation"]["all"].items()},
    "epochs_run": len(epochs),
    "seconds_per_epoch_median": sorted(seconds)[len(seconds) // 2] if seconds else None,
    "train_seconds": metrics.get("train_seconds"),
    "prepare_seconds": int(sys.argv[3]),
    "train_step_wall_seconds": int(sys.argv[4]),
}
json.dump(summary, open(sys.argv[2], "w"), indent=2)
print(json.dumps(summary, indent=2))
EOF
log "done: $RESULTS/train.json, $RESULTS/fold.json"
