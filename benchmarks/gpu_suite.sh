#!/usr/bin/env bash
# GPU suite: one command, results under OUT_DIR; every step fits a budget (460 s by default). With the defaults below
# it finished in 385 s on one H100 at 6f67a38 (benchmarks/RESULTS.md): check 34 s, loader 16, train_b256 101,
# attention 26, pytest_gpu 71, kernels 40, train_b64 96, plot 1. The Triton attention kernel (later) adds a column to
# the attention step (26 s with it on an H200 at a27f55a) and tests to pytest_gpu (~30 s more, from the H200's
# attention tests): if the budget runs short, the last step (train_b64) is the one cut, and SUITE_BUDGET_S can give
# it room. (At 455c577, with `compiled` and the stream step
# also on by default, the budget ran out while train_b64 compiled, after its eager row; those two are now opt-in.)
#
#   benchmarks/gpu_suite.sh OUT_DIR [WHEELS_DIR]          # on the GPU machine, from any directory
#   benchmarks/gpu_suite.sh OUT_DIR --cpu-dry-run          # the same logic on CPU: tiny preset, few steps
#
# Steps (each under `timeout`, capped by what is left of the suite budget, so one hang cannot eat it all):
#   check       python imports: torch with CUDA, triton, accelerate, einops, numpy, tqdm, safetensors, matplotlib,
#               pytest; webdataset, nnAudio, soundfile, soxr are installed from WHEELS_DIR (pip --no-index
#               --target into the suite's temp folder) when missing. Anything still missing stops the suite with a
#               message naming it.
#   loader      benchmarks/loader.py, short: shards vs per-clip .npy; its data is reused by the training runs
#   train_b256  benchmarks/train_throughput.py, matpac preset (ViT-B), batch 256 per device, modes eager,
#               compiled+kernels, reference-design (SUITE_MODES; add `compiled` for the kernels' share: it then runs
#               at batch 64 too, ~70 s more, unless SUITE_SMALL_MODES is set), data from
#               the loader step's shards (reference-design: its per-clip .npy folder); compiled modes use
#               SUITE_COMPILE_MODE (default reduce-overhead: CUDA graphs, +2 to +4 % over default in H200 runs);
#               reference-design is the authors' fairseq training step on our model (benchmarks/_peer.py: weights
#               in the run's dtype without autocast, written-out timm attention, FP16Optimizer, in-forward EMA)
#   stream      only with SUITE_STREAM=1: compiled+kernels at batch 256 again with the residual stream in bf16
#               (--stream-dtype amp), right after train_b256, so the two rows compare side by side (cap 150 s: with
#               train_big skipped it is the first compile, on a cold cache, ~70-90 s on the H100 machine; 67-70 s on
#               an H200)
#   attn_triton only with SUITE_ATTN_TRITON=1: compiled+kernels at batch 256 with the bf16 stream, as the stream
#               step, but --attn-impl triton (the project's attention kernel, autotuned at its first call; 71 s on an
#               H200 at a27f55a after the stream step, +8.7 % samples/s over it; as the first compile, on cold caches,
#               its first warm-up step alone took 87 s at cb5dc27: cap 180 s) (skipped in the dry run: the tiny
#               preset's 8-wide predictor heads are not a width the kernel takes)
#   inductorN   only with SUITE_INDUCTOR: one step per variant (variants separated by |, each a space-separated list
#               of KEY=VALUE torch.compile Inductor options, train_throughput.py --inductor): the attn_triton step's
#               run plus those options (cap 240 s each: GEMM autotuning restricted to one Triton configuration took
#               197 s on an H200 at cb5dc27; the dry run keeps SDPA), so that each row and the attn_triton row beside
#               it differ in one setting. A variant that repeats the baseline (triton.cudagraphs=true, which
#               reduce-overhead sets anyway) as the last one shows drift over the run, e.g.
#               SUITE_INDUCTOR='coordinate_descent_tuning=true|triton.cudagraphs=true'
#   gemm_autotune only with SUITE_GEMM_AUTOTUNE=1: compiled+kernels at batch 256 with the bf16 stream, as the stream
#               step, but --compile-mode gemm-autotune (CUDA graphs + Inductor's Triton GEMM templates, which can
#               fuse bias, GELU and casts into the GEMM; cap 240 s, which is too short: on an H200 at 5702997 it
#               had tuned 13 forward GEMMs, 8-25 s each, when the cap killed it; the dry run compiles it too: 9 s to
#               ~100 s on 2 CPU cores). An MFU session (benchmarks/RESULTS.md, "The next GPU session"): the fastest
#               step measured (attn_triton) as the baseline, an Inductor variant beside it, the baseline repeated,
#               and a profile (~450 s estimated from the step times measured so far):
#               SUITE_ATTN_TRITON=1 SUITE_PROFILE=1 SUITE_BUDGET_S=500 SUITE_INDUCTOR="max_autotune_gemm=true
#               test_configs.autotune_choice_desc_regex=$ONE_CONFIG|triton.cudagraphs=true"
#               SUITE_SKIP=loader,train_big,attention,pytest_gpu,kernels,train_small, where ONE_CONFIG (no spaces, no |)
#               keeps cuBLAS and one Triton GEMM configuration:
#               '^(?:.*BLOCK_K=64,.BLOCK_M=128,.BLOCK_N=128,.*num_stages=3,.num_warps=4.*)?$'
#               and, if the device time left allows a second call on the warm machine, batch 512 and the attention
#               timed from CUDA graphs:
#               SUITE_BIG_BATCH=512 SUITE_ATTN_TRITON=1 SUITE_ATTN_GRAPHS=1
#               SUITE_SKIP=loader,train_big,pytest_gpu,kernels,ema,train_small (plus the best variant as SUITE_INDUCTOR)
#   attention   benchmarks/attention.py: SDPA backends, compiled math and the Triton kernel on the student / teacher /
#               predictor shapes (26-30 s, 26 s with the kernel's column on an H200: cap 90 s), each call timed
#               eager, host cost included (with SUITE_ATTN_GRAPHS=1: `attention.py --graphs`, replayed from CUDA
#               graphs, as the training step runs them; GPU only)
#   pytest_gpu  the GPU tests (pytest -m gpu: bf16 kernels, CUDA log-mel, pinned loader batches; the log lists the
#               8 slowest and the pass count; it took 71-84 s on the H100 machine before the attention kernel's
#               tests, which took ~30 s on an H200: its cap is 150 s)
#   kernels     benchmarks/kernels.py (Triton kernels vs eager / compiled references)
#   ema         benchmarks/ema.py: the teacher EMA's compensated update eager vs compiled (what a compiled training step
#               runs) on the preset's weights, plus the plain update; its first compiled call compiles (not yet run on
#               a GPU: 46 s for ViT-B on 2 idle CPU cores, 135 s loaded, 23 s for the dry run's tiny preset; cap 90 s)
#   train_b64   as train_b256 at batch 64 per device (SUITE_SMALL_MODES, default SUITE_MODES' value; each compiled
#               mode compiles for ~40 s on an H200, ~70 s on the H100 machine)
#   profile     only with SUITE_PROFILE=1: benchmarks/profile_step.py on compiled+kernels at batch 256 with the bf16
#               stream and, on a GPU, the Triton attention (the fastest step measured, H200 a27f55a; the dry run's
#               tiny preset keeps SDPA): where the GPU time goes, by kernel class (logs.tar.gz: profile.log)
#   plot        benchmarks/plot_results.py -> throughput.png (given up to 20 s past the budget when train.csv has rows)
#
# OUT_DIR receives (few files, so that a remote runner can ship them back): summary.txt (environment, each step's
# status and time, the RESULT lines), train.csv, RESULTS.md (markdown rows to paste into benchmarks/RESULTS.md),
# kernels.csv, loader.csv, throughput.png, logs.tar.gz (every step's full log). An OUT_DIR holding any of these from an
# earlier suite is refused, except a failed environment check's summary.txt and logs.tar.gz (no results): rerun into it.
#
# The project is imported from this checkout without `pip install -e .`: PYTHONPATH gets the repository root and a
# temporary folder holding a symlink matpac_kernels -> kernels/ (pyproject's package-dir name), so nothing is
# written into site-packages and a stale installed copy cannot shadow the checkout.
#
# Wheels for a machine without network (Python 3.12, x86-64), made where pip works:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d WHEELS_DIR webdataset braceexpand nnAudio soundfile cffi pycparser soxr
#   (nnAudio also needs scipy; webdataset pyyaml and numpy — usually present.)
#
# Environment: PYTHON (default python3), MATPAC_COMMIT (the commit to report, for a copied tree),
# SUITE_BUDGET_S (default 460 on GPU, 1200 dry run), SUITE_STEPS (timed steps per training run, default 25; 2 dry run),
# SUITE_BIG_BATCH (the batch per device of train_big, stream, attn_triton, inductorN, gemm_autotune and profile;
# default 256 on GPU, 16 dry run; e.g. 512, the best MFU measured, for a second call after an MFU session's first),
# SUITE_COMPILE_MODE (torch.compile mode of the compiled modes: default | reduce-overhead | max-autotune-no-cudagraphs
# | gemm-autotune),
# SUITE_MODES (modes of train_b256, and of train_b64 unless SUITE_SMALL_MODES is set), SUITE_SMALL_MODES,
# SUITE_STREAM=1 (run the stream step), SUITE_ATTN_TRITON=1 (run the attn_triton step), SUITE_INDUCTOR (the
# inductorN steps' variants, see above), SUITE_GEMM_AUTOTUNE=1 (run the gemm_autotune step), SUITE_PROFILE=1 (run the
# profile step), SUITE_ATTN_GRAPHS=1 (the attention step times each call replayed from a CUDA graph,
# `attention.py --graphs`, as the training step runs them; GPU only),
# SUITE_SKIP (comma list of steps not to run: loader train_big stream attn_triton inductor gemm_autotune attention
# pytest_gpu kernels ema train_small profile; e.g. an MFU session's SUITE_SKIP=loader,train_big,kernels,train_small: the
# training runs then read synthetic data),
# SUITE_ALLOW_MISSING=1 (warn instead of stopping when the wheel-installable packages are missing; the GPU tests then
# run with --continue-on-collection-errors). Each setting is checked before anything runs; a bad one stops the suite
# with one line naming it.
set -uo pipefail

# The header's two command lines, found by content: a fixed line range printed prose once the header grew.
usage() { echo "usage:" >&2; grep '^#   benchmarks/gpu_suite.sh ' "$0" | sed 's/^#//' >&2; exit 2; }

DRY=0
POS=()
for a in "$@"; do
  case "$a" in
    --cpu-dry-run) DRY=1 ;;
    -h|--help) sed -n "2,/^set -uo/p" "$0" | sed "$ d" | sed "s/^# \{0,1\}//"; exit 0 ;;
    -*) echo "error: unknown option $a" >&2; usage ;;
    *) POS+=("$a") ;;
  esac
done
[ "${MATPAC_SUITE_DRY_RUN:-0}" = 1 ] && DRY=1
[ ${#POS[@]} -ge 1 ] && [ ${#POS[@]} -le 2 ] || usage
OUT=${POS[0]}
WHEELS=${POS[1]:-}
[ -n "$OUT" ] || usage
if [ -n "$WHEELS" ] && [ ! -d "$WHEELS" ]; then
  echo "error: WHEELS_DIR $WHEELS is not a directory" >&2; exit 2
fi
# Absolute now: the suite runs from the repository root, so a relative WHEELS_DIR given from another directory
# was looked up there (pip: "'wh/*.whl' ... does not exist") and the check stopped the suite.
[ -z "$WHEELS" ] || WHEELS=$(cd "$WHEELS" && pwd)

# The settings are checked before anything runs. A typo used to surface only at the training steps, after minutes of
# device time (an unknown mode, SUITE_STEPS=0), or as a bash arithmetic error mid-suite (SUITE_BUDGET_S=abc; with
# SUITE_BUDGET_S=1e3 every step was dropped and the suite exited 0); SUITE_STREAM=yes silently ran no stream step.
bad() { echo "error: $*; see the header of $0 (nothing was run)" >&2; exit 2; }
for v in SUITE_BUDGET_S SUITE_STEPS SUITE_BIG_BATCH; do  # no leading zero: bash arithmetic reads 010 as octal
  [ -z "${!v:-}" ] || [[ "${!v}" =~ ^[1-9][0-9]*$ ]] ||
    bad "$v=${!v}: give a whole number >= 1 (digits only, no leading 0)"
done
KNOWN_MODES=(eager compiled compiled+kernels reference-design)  # train_throughput.py's MODES
for v in SUITE_MODES SUITE_SMALL_MODES; do  # as train_throughput.py reads --modes: comma list, blanks ignored
  [ -n "${!v:-}" ] || continue
  IFS=, read -ra entries <<< "${!v}"
  n=0
  for m in "${entries[@]}"; do
    m="${m#"${m%%[![:space:]]*}"}"; m="${m%"${m##*[![:space:]]}"}"  # trim the ends only, as train_throughput.py does
    [ -n "$m" ] || continue
    [[ " ${KNOWN_MODES[*]} " == *" $m "* ]] || bad "$v=${!v}: unknown mode '$m' (modes: ${KNOWN_MODES[*]})"
    n=$(( n + 1 ))
  done
  (( n > 0 )) || bad "$v=${!v} names no mode (modes: ${KNOWN_MODES[*]})"
done
case "${SUITE_COMPILE_MODE:-default}" in
  default|reduce-overhead|max-autotune-no-cudagraphs|gemm-autotune) ;;
  *) bad "SUITE_COMPILE_MODE=$SUITE_COMPILE_MODE: give default, reduce-overhead, max-autotune-no-cudagraphs or gemm-autotune" ;;
esac
SKIPPABLE=(loader train_big stream attn_triton inductor gemm_autotune attention pytest_gpu kernels ema train_small
  profile)
if [ -n "${SUITE_SKIP:-}" ]; then
  IFS=, read -ra entries <<< "$SUITE_SKIP"
  for k in "${entries[@]}"; do
    [[ " ${SKIPPABLE[*]} " == *" $k "* ]] || bad "SUITE_SKIP=$SUITE_SKIP: unknown step '$k' (steps: ${SKIPPABLE[*]})"
  done
fi
for v in SUITE_STREAM SUITE_ATTN_TRITON SUITE_GEMM_AUTOTUNE SUITE_PROFILE SUITE_ATTN_GRAPHS SUITE_ALLOW_MISSING; do
  case "${!v:-0}" in 0|1) ;; *) bad "$v=${!v}: give 1 (on) or 0 (off)" ;; esac
done
# SUITE_INDUCTOR: variants separated by |, each a space-separated list of KEY=VALUE Inductor options (whether each KEY
# is an option of the machine's torch is checked by train_throughput.py, in seconds, before its step compiles).
VARIANTS=()
if [ -n "${SUITE_INDUCTOR:-}" ]; then
  IFS='|' read -ra VARIANTS <<< "$SUITE_INDUCTOR"
  [[ "$SUITE_INDUCTOR" != *"|" ]] || bad "SUITE_INDUCTOR='$SUITE_INDUCTOR' ends in |: an empty variant"
  for variant in "${VARIANTS[@]}"; do
    read -ra words <<< "$variant"
    (( ${#words[@]} > 0 )) ||
      bad "SUITE_INDUCTOR='$SUITE_INDUCTOR' has an empty variant (variants are separated by |, options by spaces)"
    for w in "${words[@]}"; do
      [[ "$w" =~ ^[A-Za-z_][A-Za-z0-9_.]*=.+$ ]] || bad "SUITE_INDUCTOR: '$w' is not KEY=VALUE (e.g. coordinate_descent_tuning=true)"
    done
  done
fi

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
if [ "$DRY" = 1 ]; then BUDGET=${SUITE_BUDGET_S:-1200}; else BUDGET=${SUITE_BUDGET_S:-460}; fi
STEPS=${SUITE_STEPS:-25}
WARMUP=5
START=$SECONDS

# An OUT_DIR holding an earlier suite's results is refused. One where only a failed environment check left its
# summary.txt (ending in the CHECK_FAILED line) and logs.tar.gz is reused: that run produced nothing, and both files
# are overwritten.
CHECK_FAILED="stopping: the environment check failed"
for f in train.csv RESULTS.md kernels.csv loader.csv throughput.png summary.txt logs.tar.gz; do
  [ -e "$OUT/$f" ] || continue
  case "$f" in
    summary.txt) grep -q "^$CHECK_FAILED" "$OUT/$f" 2>/dev/null && continue ;;
    logs.tar.gz) [ -e "$OUT/summary.txt" ] && grep -q "^$CHECK_FAILED" "$OUT/summary.txt" 2>/dev/null && continue ;;
  esac
  echo "error: OUT_DIR $OUT already holds an earlier suite's $f; give a new or empty folder (nothing was changed)" >&2
  exit 2
done
[ ! -e "$OUT" ] || [ -d "$OUT" ] || { echo "error: OUT_DIR $OUT is a file; give a new or empty folder" >&2; exit 2; }
err=$(mkdir -p "$OUT" 2>&1) || { echo "error: cannot create OUT_DIR $OUT (${err##*: })" >&2; exit 2; }
OUT=$(cd "$OUT" && pwd)
SUMMARY="$OUT/summary.txt"
# Written first: a folder that cannot be written used to run every step anyway, each one's results lost with a
# traceback, and no summary or logs left at the end.
if ! { : > "$SUMMARY"; } 2>/dev/null; then
  echo "error: cannot write into OUT_DIR $OUT (read-only or no permission); give a writable folder" >&2; exit 2
fi
WORK=$(mktemp -d "${TMPDIR:-/tmp}/matpac-suite.XXXXXX")
LOGS="$WORK/logs"
mkdir -p "$LOGS" "$WORK/pypath"

finish() {
  tar czf "$OUT/logs.tar.gz" -C "$WORK" logs 2>/dev/null
  rm -rf "$WORK"
}
trap finish EXIT
STEP_PID=  # the running step's `timeout`, which forwards a TERM to the step's whole process group
on_signal() {
  # jobs -p as well: a signal between `timeout ... &` and `STEP_PID=$!` runs this trap with STEP_PID still empty
  local pids
  pids=$(echo "$STEP_PID" $(jobs -p))
  if [ -n "$pids" ]; then kill -TERM $pids 2>/dev/null; wait $pids 2>/dev/null; fi
  echo "interrupted" | tee -a "$SUMMARY"
  exit 130
}
trap on_signal INT TERM

ln -s "$REPO/kernels" "$WORK/pypath/matpac_kernels"
export PYTHONPATH="$WORK/pypath:$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
cd "$REPO" || exit 2

say() { echo "$*" | tee -a "$SUMMARY"; }
FAILED=0

# step NAME CAP_S CMD... : run CMD under timeout min(CAP, budget left), log to $LOGS/NAME.log, record the outcome.
skipped() {  # skipped KEY: true (and said) when SUITE_SKIP names the step
  [[ ",${SUITE_SKIP:-}," == *",$1,"* ]] || return 1
  say "SKIP  $1: in SUITE_SKIP"
}

step() {
  local name=$1 cap=$2; shift 2
  local left=$(( BUDGET - (SECONDS - START) ))
  if (( left < 20 )); then say "SKIP  $name: suite budget (${BUDGET}s) spent"; FAILED=1; return 1; fi
  local t=$(( cap < left ? cap : left ))
  echo "=== $name (timeout ${t}s, $(( SECONDS - START ))s into the suite) ==="
  local t0=$SECONDS
  # Started in the background and waited for: bash runs a trap only once a foreground command returns, and
  # `timeout` puts the step in its own process group, out of the terminal's reach, so a Ctrl-C used to wait for the
  # step to finish (up to its cap). `wait` returns at once on a trapped signal.
  timeout --kill-after=15 "$t" "$@" > "$LOGS/$name.log" 2>&1 &
  STEP_PID=$!
  wait "$STEP_PID"
  local rc=$?
  STEP_PID=
  local dt=$(( SECONDS - t0 ))
  tail -n 4 "$LOGS/$name.log" | cut -c1-300
  if (( rc == 0 )); then say "OK    $name (${dt}s)"
  elif (( rc == 124 || rc == 137 )); then say "TIME  $name: killed after ${t}s (see logs.tar.gz: $name.log)"; FAILED=1
  else say "FAIL  $name: exit $rc after ${dt}s (see logs.tar.gz: $name.log)"; FAILED=1; fi
  grep -h '^RESULT' "$LOGS/$name.log" >> "$SUMMARY"
  leftover_gpu_processes "$name"
  return $rc
}

# After a step its own processes are gone, so a process still on the GPU is a leftover (of a killed step, or not
# the suite's) that slows every later figure. On an H200 at cb5dc27 one setting's step went from 64.6 to 78.4 ms
# between two runs 7 minutes apart, after runs killed by their caps, on a machine no check then looked at.
leftover_gpu_processes() {
  [ "$DRY" = 1 ] && return 0
  command -v nvidia-smi > /dev/null || return 0
  local apps
  apps=$(nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv,noheader 2>/dev/null | tr '\n' ';')
  [ -z "$apps" ] && return 0
  say "note: after $1, processes still on the GPU (later figures may be slowed): ${apps%;}" \
    "· load average $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null)"
}

# ---------------------------------------------------------------------------------------------------- check
# missing NAMES... : prints the modules among NAMES that fail to import, each with its error, one per line.
missing() {
  "$PY" - "$@" <<'EOF'
import importlib, sys
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except Exception as e:  # noqa: BLE001 - any import failure means "missing" here
        print(f"{name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
EOF
}

check() {
  command -v "$PY" >/dev/null || { echo "error: no Python interpreter '$PY' (set PYTHON=...)"; return 2; }
  local req opt
  req=$(missing torch triton accelerate einops numpy tqdm safetensors matplotlib pytest)
  if [ -n "$req" ]; then
    echo "error: missing Python packages (install them into $PY; this suite installs nothing from the network):"
    echo "$req"
    return 2
  fi
  if [ "$DRY" = 0 ]; then
    "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' || {
      echo "error: torch $("$PY" -c 'import torch; print(torch.__version__)') sees no CUDA device (driver? CPU-only build?)"
      return 2; }
  fi
  local wanted=(webdataset nnAudio soundfile soxr)
  opt=$(missing "${wanted[@]}")
  if [ -n "$opt" ] && [ -n "$WHEELS" ]; then
    local names
    names=$(echo "$opt" | cut -d: -f1 | tr '\n' ' ')
    echo "installing from $WHEELS into $WORK/site (put on PYTHONPATH; the interpreter's own packages are not touched): $names"
    # --no-deps: install what the folder has; a dependency it lacks shows up in the re-check below, by name.
    # --target: works when the interpreter's site-packages is read-only, and leaves nothing behind on the machine.
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" \
      "$WHEELS"/*.whl 2>&1 | tail -n 5
    export PYTHONPATH="$PYTHONPATH:$WORK/site"
    opt=$(missing "${wanted[@]}")
  fi
  if [ -n "$opt" ]; then
    echo "missing Python packages (their tests cannot be collected):"
    echo "$opt"
    echo "give WHEELS_DIR with their wheels and dependencies (webdataset braceexpand nnAudio soundfile cffi pycparser soxr), see the header of $0"
    if [ "${SUITE_ALLOW_MISSING:-0}" = 1 ]; then echo "SUITE_ALLOW_MISSING=1: going on without them"; return 0; fi
    return 2
  fi
  "$PY" - <<'EOF'
import platform, subprocess, torch, triton, accelerate
import matpac_fast, matpac_kernels
print(f"python {platform.python_version()} · torch {torch.__version__} (CUDA {torch.version.cuda}) · triton "
      f"{triton.__version__} · accelerate {accelerate.__version__}")
print(f"matpac_fast from {matpac_fast.__file__}; matpac_kernels from {matpac_kernels.__file__}")
if torch.cuda.is_available():
    print(f"device: {torch.cuda.get_device_name(0)}")
EOF
}

# MATPAC_COMMIT, when set, names the commit (a remote runner's copy of the tree may have no .git, or a stale one);
# else git's. The benchmarks read it too.
if [ -z "${MATPAC_COMMIT:-}" ]; then
  MATPAC_COMMIT=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)
  [ -n "$(git -C "$REPO" status --porcelain --untracked-files=no 2>/dev/null)" ] && MATPAC_COMMIT+="+dirty"
fi
export MATPAC_COMMIT
{
  echo "matpac_fast GPU suite · $(date -u +%Y-%m-%dT%H:%M:%SZ) · commit $MATPAC_COMMIT · dry run: $DRY · budget ${BUDGET}s"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "nvidia-smi: not available"
} | tee -a "$SUMMARY"

# Not under `timeout` (a shell function cannot be): it only imports modules and, with WHEELS_DIR, runs pip offline.
if check > "$LOGS/check.log" 2>&1; then
  say "OK    check ($(( SECONDS - START ))s)"
else
  cat "$LOGS/check.log"
  say "FAIL  check: $(grep -m1 -E '^(error|missing)' "$LOGS/check.log")"
  say "$CHECK_FAILED (full message above and in logs.tar.gz: check.log)"
  exit 2
fi
sed -n '/^python /,$p' "$LOGS/check.log" >> "$SUMMARY"
PYTEST_EXTRA=()
[ "${SUITE_ALLOW_MISSING:-0}" = 1 ] && PYTEST_EXTRA=(--continue-on-collection-errors)

# ---------------------------------------------------------------------------------------------------- settings
if [ "$DRY" = 1 ]; then
  # One thread per process: on a small shared CPU, OpenMP threads that wait on each other slow steps ~50x.
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  PRESET=tiny; DEVICE=cpu; PRECISION=no; BIG=${SUITE_BIG_BATCH:-16}; SMALL=8; STEPS=${SUITE_STEPS:-2}; WARMUP=1
  COMPILE_MODE=${SUITE_COMPILE_MODE:-default}; ATTN_BATCH=2; PROFILE_ATTN=sdpa
  MODES=${SUITE_MODES:-eager,reference-design}; SMALL_MODES=${SUITE_SMALL_MODES:-$MODES}; STREAM_MODES=eager
  LOADER_FRAMES=700; LOADER_PER_SHARD=16; LOADER_WORKERS=1; EMA_REPEATS=1
else
  PRESET=matpac; DEVICE=cuda; PRECISION=bf16; BIG=${SUITE_BIG_BATCH:-256}; SMALL=64
  COMPILE_MODE=${SUITE_COMPILE_MODE:-reduce-overhead}; ATTN_BATCH=256; PROFILE_ATTN=triton
  # Most informative first: a run killed by its timeout keeps the rows it finished.
  MODES=${SUITE_MODES:-eager,compiled+kernels,reference-design}; STREAM_MODES=compiled+kernels
  SMALL_MODES=${SUITE_SMALL_MODES:-$MODES}
  LOADER_FRAMES=1000; LOADER_PER_SHARD=256; LOADER_WORKERS=8; EMA_REPEATS=20
fi
CLIPS=$(( (WARMUP + STEPS + 1) * BIG ))  # one epoch covers every step of the big-batch runs: no worker restarts
DATA="$WORK/data"

# ---------------------------------------------------------------------------------------------------- steps
# Order: the throughput figures (the suite's purpose) first, then the GPU tests and kernel benchmarks, then the
# second batch size; every step is capped by the budget left, so a slow step shortens the ones after it.
skipped loader || step loader 100 "$PY" benchmarks/loader.py --clips "$CLIPS" --frames "$LOADER_FRAMES" --per-shard "$LOADER_PER_SHARD" \
  --batch "$BIG" --workers "$LOADER_WORKERS" --passes 1 --paths indexed,npy --keep "$DATA" --csv "$OUT/loader.csv"

if [ -f "$DATA/shards/stats.json" ] && [ -f "$DATA/npy/.done" ]; then
  TRAIN_DATA=(--data "$DATA/shards" --npy-dir "$DATA/npy")
else
  say "note: the loader step left no data; training runs use synthetic data and write their own .npy folder"
  TRAIN_DATA=(--data synthetic --tmp-dir "$WORK")
fi
train() {  # train NAME CAP BATCH MODES [EXTRA ARGS...]
  local name=$1 cap=$2 batch=$3 modes=$4; shift 4
  step "$name" "$cap" "$PY" benchmarks/train_throughput.py --preset "$PRESET" --device "$DEVICE" \
    --precision "$PRECISION" --batch-sizes "$batch" --modes "$modes" --steps "$STEPS" --warmup "$WARMUP" \
    "${TRAIN_DATA[@]}" --compile-mode "$COMPILE_MODE" --csv "$OUT/train.csv" --results-md "$OUT/RESULTS.md" "$@"
}
skipped train_big || train "train_b$BIG" 240 "$BIG" "$MODES"
if [ "${SUITE_STREAM:-0}" = 1 ]; then
  skipped stream || train stream 150 "$BIG" "$STREAM_MODES" --stream-dtype amp
fi
if [ "${SUITE_ATTN_TRITON:-0}" = 1 ] && [ "$DRY" = 1 ]; then
  say "SKIP  attn_triton: the tiny preset's predictor heads are 8 wide, which the Triton attention kernel does not take"
elif [ "${SUITE_ATTN_TRITON:-0}" = 1 ]; then
  skipped attn_triton || train attn_triton 180 "$BIG" compiled+kernels --attn-impl triton --stream-dtype amp
fi
# One step per SUITE_INDUCTOR variant, each the attn_triton step's run (SDPA in the dry run) plus its options: the
# attn_triton row beside them is their baseline.
VARIANT_ATTN=(--attn-impl triton)
[ "$DRY" = 1 ] && VARIANT_ATTN=()
n=0
for variant in "${VARIANTS[@]}"; do
  n=$(( n + 1 ))
  read -ra words <<< "$variant"
  opts=()
  for w in "${words[@]}"; do opts+=(--inductor "$w"); done
  skipped inductor || train "inductor$n" 240 "$BIG" compiled+kernels "${VARIANT_ATTN[@]}" --stream-dtype amp "${opts[@]}"
done
# compiled+kernels in the dry run too (not the dry run's eager stream mode): an eager row would ignore the compile
# mode, and the step's own code path would first run on a GPU. The later --compile-mode wins over train()'s.
if [ "${SUITE_GEMM_AUTOTUNE:-0}" = 1 ]; then
  skipped gemm_autotune || train gemm_autotune 240 "$BIG" compiled+kernels --compile-mode gemm-autotune \
    --stream-dtype amp
fi
ATTN_TIMING=()
if [ "${SUITE_ATTN_GRAPHS:-0}" = 1 ] && [ "$DRY" = 1 ]; then
  say "note: SUITE_ATTN_GRAPHS=1 needs a CUDA GPU (CUDA graphs); the dry run's attention step times eager calls"
elif [ "${SUITE_ATTN_GRAPHS:-0}" = 1 ]; then
  ATTN_TIMING=(--graphs)
fi
skipped attention || step attention 90 "$PY" benchmarks/attention.py --preset "$PRESET" --batch "$ATTN_BATCH" --reps 1 \
  "${ATTN_TIMING[@]}"
# No -q here: pyproject's addopts already has one, and -qq drops pytest's "N passed" line from the log.
skipped pytest_gpu || step pytest_gpu 150 "$PY" -m pytest -m gpu -p no:cacheprovider -rs --durations=8 "${PYTEST_EXTRA[@]}" tests
skipped kernels || step kernels 80 "$PY" benchmarks/kernels.py --out "$OUT/kernels.csv"
# The teacher EMA's compensated update, eager against compiled (what a compiled training step runs), on the
# preset's weights; the first compiled call compiles.
skipped ema || step ema 90 "$PY" benchmarks/ema.py --preset "$PRESET" --device "$DEVICE" --repeats "$EMA_REPEATS"
skipped train_small || train "train_b$SMALL" 200 "$SMALL" "$SMALL_MODES"
if [ "${SUITE_PROFILE:-0}" = 1 ]; then
  skipped profile || step profile 150 "$PY" benchmarks/profile_step.py --preset "$PRESET" --device "$DEVICE" --precision "$PRECISION" \
    --batch "$BIG" --stream-dtype amp --attn-impl "$PROFILE_ATTN" --steps 3 --warmup "$WARMUP" --top 30
fi

if [ -s "$OUT/train.csv" ]; then
  # Drawn even when the steps before spent the budget (on the H100 machine at 455c577 it was skipped so): it takes a
  # few seconds, and its rows are what the suite is for. It gets 20 s from now, not past the budget: a step killed at
  # the budget can take a second or more to exit.
  used=$(( SECONDS - START ))
  BUDGET=$(( used + 20 > BUDGET ? used + 20 : BUDGET )) step plot 20 "$PY" benchmarks/plot_results.py "$OUT/train.csv" \
    --out "$OUT/throughput.png"
fi

say "suite finished in $(( SECONDS - START ))s (budget ${BUDGET}s)"
echo
cat "$SUMMARY"
[ -f "$OUT/RESULTS.md" ] && cat "$OUT/RESULTS.md"
exit $FAILED
