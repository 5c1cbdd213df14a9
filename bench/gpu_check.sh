#!/usr/bin/env bash
# One prepared run on the GPU machine: install what it lacks, check correctness on
# the GPU first, then run the benchmarks and write their JSON and logs to $OUT.
#
#   bash bench/gpu_check.sh [stage ...]      stages: setup kernels awc loss synth cache train e2e profile
#
# The GPU machine has torch/triton but no open_clip/diffusers: their wheels travel
# in .whl/ (pip wheels downloaded beforehand: `pip download -d .whl open_clip_torch diffusers ...`). Each stage has its own time limit so that one
# slow stage cannot eat the whole lease; a failed stage is logged and the next runs.
set -uo pipefail
OUT=${OUT:-$(pwd)/bench/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONSAFEPATH=1   # never import ./gift_fast from the cwd: use the install
export TRITON_INTERPRET=0 GIFT_FAST_GPU_TESTS=1 PYTHONPATH=/tmp/site
stages=${*:-setup kernels loss awc cache synth train e2e}

log() { echo "=== [$(date +%T)] $*" | tee -a "$OUT/summary.log"; }
run_stage() {  # name, limit in seconds, command...
  local name=$1 limit=$2; shift 2
  log "stage $name (limit ${limit}s): $*"
  local t0=$SECONDS
  # stage logs go to one file: only 8 files come back from the machine
  timeout --signal=INT --kill-after=10 "$limit" "$@" > "/tmp/stage_$name.log" 2>&1
  local rc=$?
  log "stage $name rc=$rc in $((SECONDS - t0))s"
  { echo "##### stage $name rc=$rc"; cat "/tmp/stage_$name.log"; } >> "$OUT/logs.txt"
  tail -n 25 "/tmp/stage_$name.log"
}

for stage in $stages; do
  case $stage in
    setup)
      log "setup"
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/site . \
        || { log "setup FAILED"; exit 1; }
      nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee -a "$OUT/summary.log"
      python3 -c "import torch, triton, open_clip, diffusers, gift_fast.kernels.awc as a; print('torch', torch.__version__, 'triton', triton.__version__, 'open_clip', open_clip.__version__, 'diffusers', diffusers.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" 2>&1 | tee -a "$OUT/summary.log"
      ;;
    kernels)  # correctness of both kernels, compiled, against the reference
      run_stage kernels ${LIMIT_KERNELS:-240} python3 -m pytest -q -p no:cacheprovider tests/test_kernel_awc.py tests/test_kernel_contrastive_distill.py ${KERNEL_TEST_ARGS:-}
      ;;
    loss)
      run_stage loss ${LIMIT_LOSS:-240} python3 -m pytest -q -s -p no:cacheprovider bench/bench_contrastive_distill.py --benchmark-json="$OUT/bench_loss.json"
      ;;
    awc)
      run_stage awc ${LIMIT_AWC:-180} python3 -m pytest -q -s -p no:cacheprovider bench/bench_awc.py --benchmark-json="$OUT/bench_awc.json"
      ;;
    cache)
      run_stage cache ${LIMIT_CACHE:-90} python3 -m gift_fast.data.cache --bench --n ${CACHE_N:-4096} --batches ${CACHE_BATCHES:-200} --device cuda
      ;;
    synth)
      GIFT_FAST_BENCH_SYNTH_SUMMARY="$OUT/synth_summary.json" \
        run_stage synth ${LIMIT_SYNTH:-300} python3 -m pytest -q -s -p no:cacheprovider bench/bench_synth.py --benchmark-json="$OUT/bench_synth.json"
      ;;
    train)
      run_stage train ${LIMIT_TRAIN:-360} python3 -m pytest -q -s -p no:cacheprovider bench/bench_train_step.py -x --benchmark-json="$OUT/bench_train.json"
      ;;
    e2e)
      run_stage e2e ${LIMIT_E2E:-300} python3 bench/e2e.py ${E2E_ARGS:-} --json "$OUT/e2e.json"
      ;;
    profile)  # where the step's time goes (torch.profiler): PROFILE_VARIANTS, default the compiled fast step
      for v in ${PROFILE_VARIANTS:-fast_compiled}; do
        run_stage "profile_$v" ${LIMIT_PROFILE:-120} python3 bench/profile_step.py --variant "$v" --out "$OUT"
      done
      ;;
    *) log "unknown stage $stage";;
  esac
done
log "done"
