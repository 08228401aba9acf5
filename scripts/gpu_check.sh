#!/usr/bin/env bash
# The CUDA half of the speed work, in one go on a GPU machine (about 5 minutes on an H100):
# the graph-capture tests, then the speed and train-speed benches on CUDA.
#
#   here:  bash scripts/setup.sh && ../shared/tools/gpu-bundle --minilm &&
#          python3 -m pip download -q --no-deps -d .gpu/whl pytest pluggy iniconfig
#   there: source .gpu/activate && bash scripts/gpu_check.sh      (carry .gpu; results land in $OUT)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-results}
mkdir -p "$out"
python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -15 | tee "$out/test_cuda.txt"
python3 -m split_model.cli bench speed --device cuda --out-dir "$out" 2>&1 | tail -3
python3 -m split_model.cli bench train-speed --device cuda --out-dir "$out" --memory "${MINILM:-minilm-l6}" 2>&1 | tail -3
python3 - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
s = json.loads((out / "speed-cuda.json").read_text())
t = json.loads((out / "train-speed-cuda.json").read_text())
print(f"device: {s['device']}")
print(f"reasoner step ms  eager {s['reasoner_step_ms']['eager']}  fast {s['reasoner_step_ms']['fast']}")
print(f"decode step ms    {s['decode_step_ms']}")
print(f"decode / fast reasoner step  {s['decode_over_reasoner_step']}")
print(f"generate ms/token {s['generate_ms_per_token']}")
for name, c in t["configs"].items():
    print(f"train {name}: eager {c['eager']['steps_per_s']} steps/s, fast {c['fast']['steps_per_s']} steps/s, x{c['fast_over_eager']}")
print(f"encode tokens/s {t['encode_tokens_per_s']}")
PY
