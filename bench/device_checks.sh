#!/usr/bin/env bash
# The GPU checks of #13 as prepared commands for a lent GPU machine that has CUDA PyTorch and
# JAX installed but cannot reach a package index (README, "Speed on a GPU").
#
#   bash bench/device_checks.sh wheels     # HERE, once: the dkd-jax dependencies such a machine
#                                          # lacks, as Python 3.12 wheels in .whl/ (git-ignored)
#   bash bench/device_checks.sh imports    # THERE: install .whl/, check that dkd-jax imports and
#                                          # JAX sees the GPU (seconds)
#   bash bench/device_checks.sh compare    # THERE: bench/compare_torch.py --device gpu
#   bash bench/device_checks.sh protocol   # THERE: bench/protocol.py, the whole paper protocol on
#                                          # the IEMOCAP-sized synthetic corpus (log-mel 40)
#
# Each command THERE writes its JSON and log under $OUT (the device tool's output folder; a temp
# dir when unset) and prints where. Extra arguments go to the Python script, e.g.
#   bash bench/device_checks.sh protocol --jobs 5
#   bash bench/device_checks.sh compare --batches 32,256 --rounds 3
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
OUT=${OUT:-$(mktemp -d)}
# What a CUDA image with torch, jax, flax, optax and orbax lacks of dkd-jax's runtime needs
# (the versions verified here; soundfile needs cffi, cffi needs pycparser).
WHEELS=(soundfile==0.14.0 cffi==2.1.1 pycparser==3.12 soxr==1.1.0 google-crc32c==1.9.0
        tensorboardX==2.6.5)

fail() { echo "device_checks: error: $*" >&2; exit 2; }

fetch_wheels() {
  mkdir -p .whl
  for w in "${WHEELS[@]}"; do
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "$w" \
      || fail "could not download $w"
  done
  ls -1 .whl
}

install_wheels() {
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/dkd_jax_site .whl/*.whl || fail "installing .whl/ failed"
    export PYTHONPATH="/tmp/dkd_jax_site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  fi
  export PYTHONUNBUFFERED=1
}

check_imports() {
  "$PY" - <<'EOF' 2>&1 | tee "$OUT/imports.log"
import importlib, sys
missing = []
for name in ("jax", "flax", "optax", "orbax.checkpoint", "soundfile", "soxr", "google_crc32c",
             "tensorboardX", "sklearn", "scipy", "tqdm", "torch"):
    try:
        importlib.import_module(name)
    except Exception as e:  # noqa: BLE001 - report every missing piece at once
        missing.append(f"{name} ({type(e).__name__}: {e})")
if missing:
    sys.exit("device_checks: missing on this machine: " + "; ".join(missing)
             + " (run `bash bench/device_checks.sh wheels` here and carry .whl)")
import jax, torch
import data_prep, dkd_jax.train_lib, dkd_jax.experiment  # noqa: F401
print("jax", jax.__version__, jax.default_backend(), [d.device_kind for d in jax.devices()])
print("torch", torch.__version__, "cuda", torch.cuda.is_available())
if jax.default_backend() != "gpu" or not torch.cuda.is_available():
    sys.exit("device_checks: JAX or torch sees no GPU here")
EOF
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  wheels)
    fetch_wheels; exit 0 ;;
  imports)
    mkdir -p "$OUT"; install_wheels; check_imports ;;
  compare)
    mkdir -p "$OUT"; install_wheels; check_imports
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.csv" || true
    "$PY" bench/compare_torch.py --device gpu --out "$OUT/compare_torch_gpu.json" "$@" \
      2>&1 | tee "$OUT/compare_torch_gpu.log" ;;
  protocol)
    mkdir -p "$OUT"; install_wheels; check_imports
    "$PY" bench/protocol.py --work /tmp/dkd_jax_protocol --out "$OUT/protocol_paper_gpu.json" \
      "$@" 2>&1 | tee "$OUT/protocol_paper_gpu.log" ;;
  *)
    fail "usage: bash bench/device_checks.sh wheels|imports|compare|protocol [script args]" ;;
esac
echo "device_checks: results in $OUT"
