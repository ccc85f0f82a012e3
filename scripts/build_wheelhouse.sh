#!/usr/bin/env bash
# Build an offline wheelhouse for GPU hosts without registry access.
#
#   scripts/build_wheelhouse.sh [--archs "8.0;9.0"] [--out wheelhouse] [--sdists DIR] [--only-kernels]
#                               [--full-mamba]
#
# Run it on a machine with registry access, the target's Python version, the torch build the target will
# use (import torch must work: the kernel builds compile against it) and, for causal-conv1d, nvcc.
# It writes into --out:
#   - every dependency of tssc as a wheel (pip wheel of the project: torch, transformers, fastapi, ...);
#   - einops, and mamba-ssm and causal-conv1d built from their sdists for the chosen CUDA architectures
#     (TORCH_CUDA_ARCH_LIST syntax, e.g. "8.0;9.0" or "9.0a"; their setup.py files hard-code a list of
#     -gencode flags, which this script replaces by the chosen ones).
# mamba-ssm is built Triton-only by default (MAMBA_SKIP_CUDA_BUILD=TRUE: no selective_scan_cuda; tssc needs
# only its Triton kernels and logs which are present); --full-mamba compiles the extension too (long).
# On the target:
#   pip install --no-index --find-links wheelhouse tssc
#   pip install --no-index --find-links wheelhouse --no-deps mamba-ssm causal-conv1d einops
# (--no-deps: mamba-ssm 2.3 lists tilelang and quack-kernels, needed only by its Mamba3 kernels.)
set -euo pipefail

ARCHS="${TORCH_CUDA_ARCH_LIST:-9.0}"
OUT="wheelhouse"
SDISTS=""
ONLY_KERNELS=0
FULL_MAMBA=0
_py="$(command -v "${PYTHON:-python3}")"
PY="$(cd "$(dirname "$_py")" && pwd)/$(basename "$_py")"
MAMBA_SPEC="mamba-ssm==2.3.2.post1"
CONV_SPEC="causal-conv1d==1.7.0"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"

while [[ $# -gt 0 ]]; do
  case "$1" in
    --archs) ARCHS="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --sdists) SDISTS="$2"; shift 2 ;;
    --only-kernels) ONLY_KERNELS=1; shift ;;
    --full-mamba) FULL_MAMBA=1; shift ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done

mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

# Echo the sdist of a package: from --sdists if it holds one, else downloaded from the index.
fetch_sdist() {
  local spec="$1" pattern="$2"
  local found=""
  if [[ -n "$SDISTS" ]]; then
    found="$(ls "$SDISTS"/$pattern 2>/dev/null | head -n1 || true)"
  fi
  if [[ -z "$found" ]]; then
    "$PY" -m pip download --no-deps --no-binary :all: -d "$WORK/sdists" "$spec" >&2
    found="$(ls "$WORK"/sdists/$pattern | head -n1)"
  fi
  echo "$found"
}

# Drop the hard-coded -gencode list of a setup.py so TORCH_CUDA_ARCH_LIST decides (one implementation,
# shared with the Dockerfile: deploy/docker/build_kernels.py).
patch_archs() {
  "$PY" - "$1" "$ROOT/deploy/docker" <<'PYEOF'
import sys
sys.path.insert(0, sys.argv[2])
from build_kernels import strip_hardcoded_arches
path = sys.argv[1]
src, count = strip_hardcoded_arches(open(path).read())
if count == 0:
    raise SystemExit(f"{path}: no hard-coded -gencode flags found; layout changed?")
open(path, "w").write(src)
PYEOF
}

build_from_sdist() {
  local sdist="$1"
  local dir="$WORK/src/$(basename "$sdist" .tar.gz)"
  mkdir -p "$WORK/src"
  tar -xzf "$sdist" -C "$WORK/src"
  patch_archs "$dir/setup.py"
  (cd "$dir" && TORCH_CUDA_ARCH_LIST="$ARCHS" "$PY" -m pip wheel --no-deps --no-build-isolation -w "$OUT" .)
}

echo "wheelhouse: $OUT; CUDA architectures: $ARCHS" >&2
"$PY" -c "import torch; print('building against torch', torch.__version__, 'CUDA', torch.version.cuda)" >&2

# mamba-ssm: pure Python + Triton unless --full-mamba
if [[ "$FULL_MAMBA" == 1 ]]; then
  MAMBA_FORCE_BUILD=TRUE build_from_sdist "$(fetch_sdist "$MAMBA_SPEC" 'mamba_ssm-*.tar.gz')"
else
  MAMBA_FORCE_BUILD=TRUE MAMBA_SKIP_CUDA_BUILD=TRUE build_from_sdist "$(fetch_sdist "$MAMBA_SPEC" 'mamba_ssm-*.tar.gz')"
fi

# causal-conv1d: needs nvcc and a CUDA build of torch
if command -v nvcc >/dev/null 2>&1 && "$PY" -c "import torch, sys; sys.exit(not torch.version.cuda)"; then
  CAUSAL_CONV1D_FORCE_BUILD=TRUE MAX_JOBS="${MAX_JOBS:-8}" \
    build_from_sdist "$(fetch_sdist "$CONV_SPEC" 'causal_conv1d-*.tar.gz')"
else
  echo "nvcc or a CUDA torch not found: skipping causal-conv1d (tssc then uses its own Triton conv step)" >&2
fi

if [[ "$ONLY_KERNELS" == 0 ]]; then
  "$PY" -m pip download -d "$OUT" einops
  "$PY" -m pip wheel -w "$OUT" "$ROOT"
fi
ls -la "$OUT" >&2
