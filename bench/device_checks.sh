#!/usr/bin/env bash
# The GPU checks of #13 as prepared commands for a lent GPU machine that has CUDA PyTorch and
# JAX installed but cannot reach a package index (README, "Speed against PyTorch": its GPU paragraphs).
#
#   bash bench/device_checks.sh wheels     # HERE, once: the dkd-jax dependencies such a machine
#                                          # lacks, as Python 3.12 wheels in .whl/ (git-ignored,
#                                          # 12 MB; carry it: run(carry=[".whl"]))
#   bash bench/device_checks.sh imports    # THERE: install .whl/, check that dkd-jax imports and
#                                          # JAX sees the GPU (seconds)
#   bash bench/device_checks.sh compare    # THERE: bench/compare_torch.py --device gpu
#   bash bench/device_checks.sh protocol   # THERE: bench/protocol.py, the whole paper protocol on
#                                          # the IEMOCAP-sized synthetic corpus (log-mel 40)
#
# Each command THERE writes its JSON and log under $OUT (the device tool's output folder; a temp
# dir when unset) and prints where. PYTHON picks the interpreter (default python3), and
# DEVICE_CHECKS_ALLOW_CPU=1 lets the commands run without a GPU (a rehearsal on a CPU machine:
# `compare` then times the CPU). Extra arguments go to the Python script, e.g.
#   bash bench/device_checks.sh protocol --jobs 5
#   bash bench/device_checks.sh compare --batches 32,256 --rounds 3
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
OUT=${OUT:-$(mktemp -d)}
# What the lent H200 machines' image (Python 3.12 with torch, jax 0.11.2, flax, optax, orbax,
# scipy, scikit-learn, pyarrow, six, ... as its package list gives them) lacks of dkd-jax's
# runtime needs, with all they need in turn: the closure pip resolved for Python 3.12 + jax
# 0.11.2, minus that image's packages.
# data_prep writes TFDS metadata, hence tensorflow-datasets and its own needs.
WHEELS=(soundfile==0.14.0 cffi==2.1.1 pycparser==3.12 soxr==1.1.0 google-crc32c==1.9.0
        tensorboardX==2.6.5 tensorflow-datasets==4.9.10 array_record==0.8.6 dm-tree==0.1.10
        docstring_parser==0.18.0 googleapis-common-protos==1.76.0 immutabledict==4.3.1
        promise==2.3 simple-parsing==0.1.9 tensorflow-metadata==1.21.0 termcolor==3.3.0
        toml==0.10.2)
# Published as source only: built here into a pure-Python wheel (checked to be "none-any").
SOURCE_ONLY=(promise==2.3)

fail() { echo "device_checks: error: $*" >&2; exit 2; }

fetch_wheels() {
  mkdir -p .whl
  local w built
  for w in "${WHEELS[@]}"; do
    [[ " ${SOURCE_ONLY[*]} " == *" $w "* ]] && continue
    # a binary wheel for CPython 3.12 on x86-64 Linux (pure-Python ones match too)
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "$w" \
      || fail "could not download a Python 3.12 x86-64 wheel of $w"
  done
  for w in "${SOURCE_ONLY[@]}"; do
    "$PY" -m pip wheel -q --no-deps -w .whl "$w" || fail "could not build a wheel of $w"
    built=$(ls .whl/"${w%%==*}"-"${w##*==}"-*.whl 2>/dev/null || true)
    case "$built" in
      *-none-any.whl) ;;
      *) fail "the wheel built of $w is not pure Python (${built:-none}): it would not install there" ;;
    esac
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

check_imports() {  # $1: "torch" when the command needs PyTorch too
  NEED_TORCH=${1:-} "$PY" - <<'EOF' 2>&1 | tee "$OUT/imports.log"
import importlib, os, sys
need_torch = os.environ["NEED_TORCH"] == "torch"
allow_cpu = os.environ.get("DEVICE_CHECKS_ALLOW_CPU") == "1"
missing = []
names = ["jax", "flax", "optax", "orbax.checkpoint", "soundfile", "soxr", "google_crc32c",
         "tensorboardX", "tensorflow_datasets.core.features", "sklearn", "scipy", "tqdm"]
for name in names + (["torch"] if need_torch else []):
    try:
        importlib.import_module(name)
    except Exception as e:  # noqa: BLE001 - report every missing piece at once
        missing.append(f"{name} ({type(e).__name__}: {e})")
if missing:
    sys.exit("device_checks: missing on this machine: " + "; ".join(missing)
             + " (run `bash bench/device_checks.sh wheels` here and carry .whl)")
import jax
import data_prep, dkd_jax.train_lib, dkd_jax.experiment  # noqa: F401
print("jax", jax.__version__, jax.default_backend(), [d.device_kind for d in jax.devices()])
gpu = jax.default_backend() == "gpu"
if need_torch:
    import torch
    print("torch", torch.__version__, "cuda", torch.cuda.is_available())
    gpu = gpu and torch.cuda.is_available()
if not gpu and not allow_cpu:
    sys.exit("device_checks: no GPU for JAX" + (" or torch" if need_torch else "") + " here "
             "(DEVICE_CHECKS_ALLOW_CPU=1 rehearses the commands on a CPU machine)")
EOF
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  wheels)
    fetch_wheels; exit 0 ;;
  imports)
    mkdir -p "$OUT"; install_wheels; check_imports torch ;;
  compare)
    mkdir -p "$OUT"; install_wheels; check_imports torch
    if command -v nvidia-smi >/dev/null; then
      nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.csv" || true
    fi
    dev=gpu; [ "${DEVICE_CHECKS_ALLOW_CPU:-}" = 1 ] && dev=cpu  # a rehearsal times the CPU
    "$PY" bench/compare_torch.py --device $dev --out "$OUT/compare_torch_$dev.json" \
      --cases-log "$OUT/compare_torch_${dev}_cases.jsonl" "$@" 2>&1 \
      | tee "$OUT/compare_torch_$dev.log" ;;
  protocol)
    mkdir -p "$OUT"; install_wheels; check_imports
    dev=gpu; [ "${DEVICE_CHECKS_ALLOW_CPU:-}" = 1 ] && dev=cpu  # a rehearsal runs on the CPU
    # one --work per machine: a second call resumes; other settings there are refused
    "$PY" bench/protocol.py --work /tmp/dkd_jax_protocol --out "$OUT/protocol_$dev.json" \
      "$@" 2>&1 | tee "$OUT/protocol_$dev.log" ;;
  *)
    fail "usage: bash bench/device_checks.sh wheels|imports|compare|protocol [script args]" ;;
esac
echo "device_checks: results in $OUT"
