#!/usr/bin/env bash
# Install fastkd in place and run the GPU suite, in one go, on a machine without network access that
# already has torch, triton and timm (no virtual environment, no DALI):
#
#     bash tests/gpu/run_gpu_suite.sh
#
# Builds fastkd._C (CUDA sources for this GPU's architecture) with
# `python3 -m pip install --no-build-isolation --no-deps -e .`, then runs `pytest -m gpu tests/gpu`
# with FASTKD_GPU_TESTS=1 (compiled Triton kernels, no interpreter). The suite prints one
# PASS|FAIL|SKIP line per check and a summary; with $OUT set, the summary goes to $OUT/gpu_suite.txt
# and the whole log to $OUT/gpu_suite.log. The run is bounded to 450 s from the start of this script
# (checks that would start later are skipped). PYTHON (default python3) picks the interpreter.
# Exit status: pytest's (0 when no check failed).
set -u -o pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
START=$(date +%s)
export FASTKD_GPU_DEADLINE=${FASTKD_GPU_DEADLINE:-$((START + 450))}
export FASTKD_GPU_TESTS=1
unset TRITON_INTERPRET
SUMMARY=/dev/null
LOG=/dev/null
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    SUMMARY="$OUT/gpu_suite.txt"
    LOG="$OUT/gpu_suite.log"
    : > "$SUMMARY"
    export FASTKD_GPU_SUMMARY="$SUMMARY"
fi

{
    echo "== fastkd GPU suite: $(date -u +%FT%TZ), $($PYTHON --version 2>&1), $(command -v "$PYTHON")"
    $PYTHON - <<'PY' 2>&1 || true
import importlib
for name in ("torch", "triton", "timm", "pytest", "ninja"):
    try:
        print(f"{name} {importlib.import_module(name).__version__}")
    except Exception as error:  # noqa: BLE001
        print(f"{name}: not importable ({error})")
import torch
print("cuda", torch.version.cuda, "devices", torch.cuda.device_count(),
      [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
PY
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader

    # Compile the CUDA sources for this GPU only (faster build), unless the caller chose.
    if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
        ARCH=$($PYTHON -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability() if torch.cuda.is_available() else "")' 2>/dev/null || true)
        [ -n "$ARCH" ] && export TORCH_CUDA_ARCH_LIST="$ARCH"
    fi
    export MAX_JOBS=${MAX_JOBS:-$(nproc)}
    echo "== install: $PYTHON -m pip install --no-build-isolation --no-deps -e . (TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-default})"
    INSTALL=("$PYTHON" -m pip install --no-build-isolation --no-deps --no-input -e .)
    INSTALL_LOG=$(mktemp)
    "${INSTALL[@]}" 2>&1 | tee "$INSTALL_LOG"
    OK=${PIPESTATUS[0]}
    if [ "$OK" != 0 ] && grep -q "externally-managed-environment" "$INSTALL_LOG"; then
        echo "== an externally managed Python: retrying with PIP_BREAK_SYSTEM_PACKAGES=1"
        export PIP_BREAK_SYSTEM_PACKAGES=1
        "${INSTALL[@]}" 2>&1 | tee "$INSTALL_LOG"
        OK=${PIPESTATUS[0]}
    fi
    if [ "$OK" != 0 ]; then
        echo "== install failed; retrying without the CUDA sources (FASTKD_BUILD_CUDA=0): the check"
        echo "   test_native_extension_has_cuda_kernels will FAIL and ema_ runs its PyTorch path"
        FASTKD_BUILD_CUDA=0 "${INSTALL[@]}" || echo "== install failed: running the suite anyway"
    fi
    rm -f "$INSTALL_LOG"
    echo "== install done after $(( $(date +%s) - START )) s; running the suite"
} 2>&1 | tee "$LOG"

if ! $PYTHON -c "import pytest" 2>/dev/null; then
    echo "FAIL gpu_suite: pytest is not installed for $PYTHON (the suite needs it)" | tee -a "$SUMMARY" "$LOG"
    exit 1
fi
$PYTHON -m pytest -m gpu -q -p no:cacheprovider -rfE tests/gpu 2>&1 | tee -a "$LOG"
STATUS=${PIPESTATUS[0]}
echo "== exit status $STATUS after $(( $(date +%s) - START )) s" | tee -a "$LOG"
[ "$SUMMARY" != /dev/null ] && echo "exit status $STATUS, $(( $(date +%s) - START )) s including the install" >> "$SUMMARY"
exit "$STATUS"
