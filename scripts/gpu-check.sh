#!/usr/bin/env bash
# On a Linux machine with an NVIDIA GPU: install mlx[cuda], run the parity and compute-path
# tests on the GPU and the benchmark's headline step, and write one JSON result.
#   scripts/gpu-check.sh [OUT_DIR]        (default: gpu-check-out/)
# Nothing else needs it; its figures go in benchmarks/RESULTS.md. See docs/precision.md.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu-check-out}
mkdir -p "$out"
export PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$out/gpu.txt"

venv=$(mktemp -d)/venv
python3 -m venv "$venv"
. "$venv/bin/activate"
pip install -q ".[test]" "mlx[cuda]"
python - <<'PY'
import mlx.core as mx
assert mx.cuda.is_available(), "mlx[cuda] found no CUDA device"
print("mlx", mx.__version__, "default device", mx.default_device(), mx.device_info())
PY

# Parity (torch reference, losses, log-probs) and the compute path, on the GPU this time.
set +e
python -m pytest -q -p no:cacheprovider --junitxml="$out/tests.xml" \
  tests/test_losses.py tests/test_logps.py tests/test_torch_parity.py \
  tests/test_platform.py tests/test_gpu_path.py tests/test_trainer.py 2>&1 | tee "$out/tests.log"
tests_status=${PIPESTATUS[0]}
set -e

# The headline point of benchmarks/RESULTS.md (2 pairs x 256 tokens, the 38.9M model).
python benchmarks/bench.py --json "$out/bench.json" 2>&1 | tee "$out/bench.log"

python - "$out" "$tests_status" <<'PY'
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path
import mlx.core as mx
out, status = Path(sys.argv[1]), int(sys.argv[2])
suite = ET.parse(out / "tests.xml").getroot()
suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
result = {
    "gpu": (out / "gpu.txt").read_text().strip(),
    "mlx": mx.__version__,
    "device_info": {k: v if isinstance(v, (int, float, str)) else str(v)
                    for k, v in mx.device_info().items()},
    "tests": {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")},
    "tests_exit_status": status,
    "bench": json.loads((out / "bench.json").read_text()),
}
(out / "gpu-check.json").write_text(json.dumps(result, indent=2) + "\n")
print(f"gpu-check: {out / 'gpu-check.json'} (tests exit status {status})")
sys.exit(status)
PY
