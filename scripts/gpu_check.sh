#!/usr/bin/env bash
# The CUDA benches in one go on a GPU machine: the graph-capture tests, the speed and
# train-speed benches (about 4 minutes on an H200), then train-modes (about 8 minutes on an
# H200 at its default 6000 steps per mode: run it alone, PARTS=train-modes). Each part has its own time limit,
# so one that hangs or fails leaves the others' results; full logs go to $OUT.
#
#   here:  bash scripts/setup.sh && ../shared/tools/gpu-bundle --minilm &&
#          python3 -m pip download -q --no-deps -d .gpu/whl pytest pluggy iniconfig
#   there: source .gpu/activate && bash scripts/gpu_check.sh      (carry .gpu; results land in $OUT)
#
# PARTS picks what runs (default: all of "tests speed train-speed train-modes");
# TRAIN_MODES_STEPS overrides train-modes' optimizer steps per mode.
set -uo pipefail
parts=" ${PARTS:-tests speed train-speed train-modes} "
cd "$(dirname "$0")/.."
out=${OUT:-results}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, lightning; print('torch', torch.__version__, 'transformers', transformers.__version__, 'lightning', lightning.__version__)"
if [[ $parts == *" tests "* ]]; then
  timeout 100 python3 -m pytest -q -p no:cacheprovider -p no:warnings tests/test_cuda.py > "$out/test_cuda.log" 2>&1
  echo "test_cuda exit $?"; tail -5 "$out/test_cuda.log"
fi
if [[ $parts == *" speed "* ]]; then
  timeout 250 python3 -m split_model.cli bench speed --device cuda --out-dir "$out" > "$out/speed.log" 2>&1
  echo "speed exit $?"; grep "^\[bench\]" "$out/speed.log" | tail -4
fi
if [[ $parts == *" train-speed "* ]]; then
  timeout 130 python3 -m split_model.cli bench train-speed --device cuda --out-dir "$out" --memory "${MINILM:-minilm-l6}" > "$out/train.log" 2>&1
  echo "train-speed exit $?"; grep "^\[bench\]\|Error" "$out/train.log" | tail -6
fi
if [[ $parts == *" train-modes "* ]]; then
  timeout "${TRAIN_MODES_S:-540}" python3 -m split_model.cli bench train-modes --device cuda --out-dir "$out" \
    ${TRAIN_MODES_STEPS:+--steps "$TRAIN_MODES_STEPS"} > "$out/modes.log" 2>&1
  echo "train-modes exit $?"; grep "^\[bench\]" "$out/modes.log" | grep -v " step [0-9]*:" | tail -12
fi
python3 - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
try:
    m = json.loads((out / "train-modes-cuda.json").read_text())
    for name, r in m["modes"].items():
        print(f"train-modes {name}: examples/s {r['examples_per_s']} accuracy {r['accuracy']} gap {r.get('exact_gap')}")
except Exception as e:
    print("train-modes-cuda.json:", type(e).__name__, e)
try:
    s = json.loads((out / "speed-cuda.json").read_text())
    print(f"device: {s['device']}")
    print(f"reasoner step ms  eager {s['reasoner_step_ms']['eager']}  fast {s['reasoner_step_ms']['fast']}")
    print(f"decode step ms    {s['decode_step_ms']}")
    print(f"decode / fast reasoner step  {s['decode_over_reasoner_step']}")
    print(f"decode / compiled reasoner step  {s['decode_over_compiled_reasoner_step']}")
    print(f"generate ms/token {s['generate_ms_per_token']}  prefill wrapper/bare {s['prefill_wrapper_over_bare']}")
except Exception as e:
    print("speed-cuda.json:", type(e).__name__, e)
try:
    t = json.loads((out / "train-speed-cuda.json").read_text())
    for name, c in t["configs"].items():
        paths = {k: v["steps_per_s"] for k, v in c.items() if isinstance(v, dict) and "steps_per_s" in v}
        print(f"train {name}: steps/s {paths}, fast/eager x{c['fast_over_eager']}")
    print(f"encode tokens/s {t['encode_tokens_per_s']}")
except Exception as e:
    print("train-speed-cuda.json:", type(e).__name__, e)
PY
