#!/usr/bin/env bash
# Crescent's GPU suite (issue 18): everything that only a CUDA machine can check, in one prepared run of at most
# 8 minutes, with no network.
#
#   1. the tests marked `gpu` (tests/test_gpu_*.py: grouped-GEMM experts vs the segment loop, bf16 autocast dtypes
#      of the hand-written autograd functions, FlexAttention vs SDPA, the fused head+loss vs F.cross_entropy,
#      Newton-Schulz bf16 vs fp32, one Muon step CUDA vs CPU, the loader's pinned memory), at most 190 s (+10 s to die);
#   2. the figures of bench/_gpu_measure.py, each in its own process under its own budget (bench/_gpu_suite.py):
#      `small` training tokens/s and MFU, the optimizer step as a fraction of forward+backward at small-gpu.yaml's
#      global batch, our step vs torch.optim.Muon's, NS vs torch.optim.Muon's, MoE fwd+bwd vs transformers;
#   3. report.json and report.md in the output directory, and `name: value` lines with the issue's goals.
#
# Usage: bench/gpu_suite.sh [--dry-run] [--out DIR] [--python PY] [--skip-tests] [--only NAME]...
#   --out DIR     where the report goes; default $OUT (the device machine sets it). One of the two is required.
#   --dry-run     on the CPU, toy sizes (what `make test` runs): the gpu tests are collected and skipped, every
#                 measurement runs small, and the report's format is checked. Hides any GPU (CUDA_VISIBLE_DEVICES).
#   --python PY   the interpreter (default $PYTHON, else python3: the device machine's python3 holds torch).
#   --skip-tests  measurements only (a rerun); --only NAME: peak, train, optimizer, newton_schulz or moe (repeatable).
# Files written (6; the device tool brings back at most 8): report.json, report.md, suite.log (everything),
# gpu-tests.xml, gpu-tests.log, measure.log. Exit status: 0 when every test passed and every measurement ran, 1 otherwise, 2 for bad usage.
#
# What the device machine must hold: python3 with torch (CUDA), transformers, pyyaml, numpy and pytest. Its image
# lists pytest, iniconfig, pluggy and packaging (/work/.library/device/KINDS.md), so nothing travels by default.
# Wheels for anything missing go under .whl/ (git-ignored; see the device README for `pip download`) and are
# installed here, before anything runs, into /tmp/crescent-site (put on PYTHONPATH); name `.whl` in the run's carry.
# The suite never imports app.tracking or mlflow (not on that machine): it measures training with plain PyTorch
# over components/.
set -uo pipefail
TESTS_BUDGET_S=190  # + the 10 s kill grace + bench/_gpu_suite.py's BUDGET_S (250 s) + start-up: under 8 minutes
KILL_GRACE_S=10     # even when every budget runs out

usage() {
  cat <<'EOF_USAGE'
Usage: bench/gpu_suite.sh [--dry-run] [--out DIR] [--python PY] [--skip-tests] [--only NAME]...
  --out DIR     where the report goes (default: $OUT)
  --dry-run     toy sizes on the CPU; gpu tests collected and skipped; the report's format checked
  --python PY   the interpreter (default: $PYTHON, else python3)
  --skip-tests  measurements only; --only NAME: peak, train, optimizer, newton_schulz or moe (repeatable)
EOF_USAGE
}
fail_usage() { echo "gpu_suite.sh: $1" >&2; usage >&2; exit 2; }

DRY_RUN=0 SKIP_TESTS=0 OUT_DIR="${OUT:-}" PY="${PYTHON:-python3}" ONLY=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --skip-tests) SKIP_TESTS=1 ;;
    --out) [ $# -ge 2 ] && [ -n "$2" ] || fail_usage "--out needs a directory"; OUT_DIR="$2"; shift ;;
    --python) [ $# -ge 2 ] && [ -n "$2" ] || fail_usage "--python needs an interpreter"; PY="$2"; shift ;;
    --only)
      [ $# -ge 2 ] || fail_usage "--only needs a measurement name"
      case "$2" in peak|train|optimizer|newton_schulz|moe) ONLY+=(--only "$2") ;;
        *) fail_usage "--only '$2' is not a measurement; choose peak, train, optimizer, newton_schulz or moe" ;; esac
      shift ;;
    -h|--help) usage; exit 0 ;;
    *) fail_usage "unknown argument '$1'" ;;
  esac
  shift
done
[ -n "$OUT_DIR" ] || fail_usage "no output directory: set OUT or pass --out DIR"
command -v "$PY" >/dev/null 2>&1 || fail_usage "--python '$PY' is not an executable"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
mkdir -p "$OUT_DIR" || fail_usage "cannot create the output directory '$OUT_DIR'"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
exec > >(tee "$OUT_DIR/suite.log") 2>&1
START=$(date +%s)

if compgen -G ".whl/*.whl" >/dev/null; then
  echo "== installing $(ls .whl/*.whl | wc -l) carried wheel(s) into /tmp/crescent-site"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/crescent-site \
    .whl/*.whl || { echo "gpu_suite.sh: installing .whl/*.whl failed"; exit 1; }
  export PYTHONPATH="/tmp/crescent-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 \
  TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
  HF_HUB_DISABLE_PROGRESS_BARS=1 TRANSFORMERS_VERBOSITY=error
DRY=()
if [ "$DRY_RUN" = 1 ]; then
  export CUDA_VISIBLE_DEVICES=""
  DRY=(--dry-run)
  echo "== dry run on the CPU: toy sizes, gpu tests collected and skipped"
elif ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_suite.sh: no CUDA device visible to $PY (torch.cuda.is_available() is False); run with --dry-run" \
       "to check the suite on a CPU" >&2
  exit 2
else
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,power.draw --format=csv 2>/dev/null || true
fi
echo "== $("$PY" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__)')"

TESTS=()
if [ "$SKIP_TESTS" = 0 ]; then
  echo "== tests marked gpu (budget $TESTS_BUDGET_S s)"
  T0=$(date +%s)
  # Every core for the tests' float64 CPU references (tests/conftest.py keeps make test's workers at one thread).
  timeout -k "$KILL_GRACE_S" "$TESTS_BUDGET_S" env CRESCENT_TEST_THREADS="$(nproc)" "$PY" -m pytest -m gpu tests/test_gpu_*.py -p no:cacheprovider -v -rs --durations=10 \
    --junitxml="$OUT_DIR/gpu-tests.xml" 2>&1 | tee "$OUT_DIR/gpu-tests.log"
  TESTS_RC=${PIPESTATUS[0]}
  TESTS=(--tests-xml "$OUT_DIR/gpu-tests.xml" --tests-log "$OUT_DIR/gpu-tests.log" --tests-rc "$TESTS_RC"
         --tests-wall "$(( $(date +%s) - T0 ))")
  [ "$TESTS_RC" = 124 ] && echo "gpu_suite.sh: the gpu tests ran past their $TESTS_BUDGET_S s budget and were stopped"
fi

"$PY" -m bench._gpu_suite --out "$OUT_DIR" "${DRY[@]}" "${ONLY[@]}" "${TESTS[@]}" 2>&1 | tee "$OUT_DIR/measure.log"
RC=${PIPESTATUS[0]}
if [ "$DRY_RUN" = 1 ]; then
  "$PY" -m bench._gpu_suite --check "$OUT_DIR" --log "$OUT_DIR/measure.log" || RC=1
fi
echo "gpu_suite_wall_s: $(( $(date +%s) - START ))"
exit $RC
