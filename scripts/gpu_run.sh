#!/usr/bin/env bash
# One GPU session's worth of checks and benchmarks, in the order that spends the least GPU time:
# the GPU tests first (their Triton compilations warm the on-disk cache for everything after them),
# then the end-to-end bench against upstream (e2e), the HTTP bench (d), the runtime benches (b) (c) (a),
# the cache bench and the kernel profile.
#
#   scripts/gpu_run.sh OUTDIR [STEPS]     STEPS: any of tests,e2e,d,bc,a,cache,profile (default: all, in order)
#
# Every table is appended to OUTDIR/bench.md as soon as it is measured, the TTFT plot goes to
# OUTDIR/ttft_vs_length.png, test output to OUTDIR/tests.txt and everything else to OUTDIR/log.txt, so a run
# cut short keeps what it measured. Each step has its own time limit (seconds, overridable by the
# environment: T_TESTS, T_E2E, T_D, T_BC, T_A, T_CACHE, T_PROFILE; E2E_SHAPES and E2E_ARGS choose the e2e
# bench's shapes and flags, "--quick" unless set: E2E_ARGS= runs its full plan). Needs CUDA, mamba-ssm and the dev extra (see the README's GPU install; on
# the borrowed GPU machine, `. scripts/device_env.sh` first).
set -u
out=${1:?usage: scripts/gpu_run.sh OUTDIR [STEPS]}
steps=${2:-tests,e2e,d,bc,a,cache,profile}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRITON_CACHE_AUTOTUNING=1
start=$(date +%s)
mark() { echo "== $1: rc $2 at $(($(date +%s) - start))s" | tee -a "$out/log.txt"; }
want() { [[ ",$steps," == *",$1,"* ]]; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >>"$out/log.txt" 2>&1
commit=$(git rev-parse --short HEAD 2>/dev/null || cat COMMIT 2>/dev/null)
echo "## run $(date -u +%FT%TZ), commit $commit" >>"$out/bench.md"

if want tests; then
  timeout "${T_TESTS:-240}" python3 -m pytest tests/gpu tests/unit/cache/test_cache_codec.py \
    tests/unit/cache/test_cache_fetch_into.py -q --tb=short -p no:cacheprovider >>"$out/tests.txt" 2>&1
  mark tests $?
fi
if want e2e; then
  # The bench starts no section within its last 60 s; the servers stop on SIGTERM from timeout.
  t_e2e=${T_E2E:-360}
  # shellcheck disable=SC2086  # E2E_SHAPES and E2E_ARGS are word lists
  timeout "$t_e2e" python3 -m bench.e2e_bench --shape ${E2E_SHAPES:-mamba2-2.7b} ${E2E_ARGS---quick} \
    --deadline $((t_e2e - 60)) --commit "$commit" --out "$out/bench.md" >>"$out/log.txt" 2>&1
  mark e2e $?
fi
if want d; then
  timeout "${T_D:-240}" python3 -m bench.http_bench --shape mamba2-1.3b --sessions 8 --turns 6 --scale 6 \
    "--cache-args=--hot-bytes 4GiB --cold-bytes 16GiB --checkpoint-interval 1024" \
    --out "$out/bench.md" --plot "$out/ttft_vs_length.png" >>"$out/log.txt" 2>&1
  mark d $?
fi
if want bc; then
  timeout "${T_BC:-180}" python3 -m bench.gpu_bench --sections bc --out "$out/bench.md" >>"$out/log.txt" 2>&1
  mark bc $?
fi
if want a; then
  timeout "${T_A:-180}" python3 -m bench.gpu_bench --sections a --out "$out/bench.md" >>"$out/log.txt" 2>&1
  mark a $?
fi
if want cache; then
  timeout "${T_CACHE:-90}" python3 bench/cache_bench.py --out "$out/bench.md" --append >>"$out/log.txt" 2>&1
  mark cache $?
fi
if want profile; then
  timeout "${T_PROFILE:-240}" python3 -m bench.gpu_profile --out "$out/bench.md" >>"$out/log.txt" 2>&1
  mark profile $?
fi
