#!/bin/bash
# A record, not part of the product: the script behind benchmarks/RESULTS.md's cb5dc27 H200 section, run from the
# repository root on the device as `MATPAC_COMMIT=cb5dc27 S17_DEADLINE=545 bash s17.sh $OUT` (one call, timeout 585 s,
# with the wheel folder .whl beside it). Its output: device_log_nvidia_h200_cb5dc27.txt.
# Device script of the seventeenth session (one call): an A/B of Inductor settings on the fastest step measured
# (compiled+kernels, Triton attention, bf16 stream, CUDA graphs, batch 256, synthetic data), then the step's GPU tests,
# a mutation check of the pinned-mask test, batch 512 with the fastest setting, and a profile of it.
# bash s17.sh OUTDIR [--dry]   (--dry: tiny preset on CPU, to check the script's own logic)
set -u
O=$1; DRY=0; [ "${2:-}" = --dry ] && DRY=1
mkdir -p "$O" /tmp/s17logs; L=/tmp/s17logs
T0=$SECONDS; DEADLINE=${S17_DEADLINE:-545}
say() { echo "[$(( SECONDS - T0 ))s] $*" | tee -a "$O/summary.txt"; }
left() { echo $(( DEADLINE - (SECONDS - T0) )); }
cap() { local want=$1 l; l=$(( $(left) - ${2:-0} )); echo $(( want < l ? want : l )); }

if [ $DRY = 0 ]; then
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader | tee -a "$O/summary.txt"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 3
  mkdir -p /tmp/pp && ln -sfn "$PWD/kernels" /tmp/pp/matpac_kernels
  export PYTHONPATH=/tmp/site:/tmp/pp:$PWD
  PY=python3; COMMON=(--preset matpac --device cuda --precision bf16 --attn-impl triton --steps 25 --warmup 5)
  B1=256; B2=512; PROF=(--preset matpac --device cuda --precision bf16 --attn-impl triton --batch 256 --steps 3 --warmup 3)
else
  PY=${PYTHON:-python3}; export OMP_NUM_THREADS=1
  COMMON=(--preset tiny --device cpu --precision no --steps 2 --warmup 1); B1=8; B2=16
  PROF=(--preset tiny --device cpu --precision no --batch 4 --steps 1 --warmup 1)
fi
export PYTHONUNBUFFERED=1
$PY -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)" \
  | tee -a "$O/summary.txt"
say "commit ${MATPAC_COMMIT:-?}"

# The one Triton GEMM configuration that was the fastest template in nearly every shape of the H200 autotune log
# (benchmarks/results/autotune_nvidia_h200_5702997.txt), and cuBLAS (ATen choices have an empty description): so
# Inductor tunes ~3 choices per GEMM instead of 22, and a template it picks takes its epilogue (bias, GELU, casts).
RE='test_configs.autotune_choice_desc_regex=^(?:.*BLOCK_K=64,.BLOCK_M=128,.BLOCK_N=128,.*num_stages=3,.num_warps=4.*)?$'
declare -A ARGS=(
  [base]=""
  [gemm1]="--compile-mode gemm-autotune --inductor $RE"
  [unfuse]="--inductor keep_addmm_fused_for_half_dtypes=false"
)
train() {  # train NAME CAP BATCH: one run, its RESULT line appended to $L/ab.txt as "NAME samples_per_s"
  local name=$1 c; c=$(cap "$2" "${4:-0}"); local batch=$3
  if [ "$c" -lt 30 ]; then say "SKIP $name: ${c}s left"; return; fi
  read -ra extra <<< "${ARGS[$name]}"
  timeout -k 10 "$c" $PY benchmarks/train_throughput.py "${COMMON[@]}" --batch-sizes "$batch" --modes compiled+kernels \
    --stream-dtype amp --data synthetic --tmp-dir /tmp --compile-mode reduce-overhead "${extra[@]}" \
    --csv "$O/train.csv" --results-md "$O/RESULTS.md" > "$L/$name-b$batch.log" 2>&1
  local rc=$? r; r=$(grep -m1 '^RESULT' "$L/$name-b$batch.log")
  say "$name b$batch rc=$rc (cap ${c}s) ${r:-no RESULT; last: $(tail -1 "$L/$name-b$batch.log" | cut -c1-300)}"
  [ -n "$r" ] && [ "$batch" = "$B1" ] && echo "$name $(sed -E 's/.*samples_per_s=([0-9.]+).*/\1/' <<< "$r")" >> "$L/ab.txt"
}
: > "$L/ab.txt"
train base 110 $B1 330
train gemm1 210 $B1 200
train unfuse 110 $B1 120

# The GPU tests outside kernels/ (the kernels' GPU tests ran at a27f55a; kernels/ changed since only in comments).
c=$(cap 90)
timeout -k 5 "$c" $PY -m pytest -m gpu -p no:cacheprovider -rs tests/test_trainer.py tests/test_loader.py \
  tests/test_shards.py > "$L/pytest.log" 2>&1
say "pytest -m gpu (trainer, loader, shards) rc=$? $(grep -E 'passed|failed|skipped|error' "$L/pytest.log" | tail -1)"
# Mutation check of the pinned-mask test: with the masks copied from pageable memory, does it fail?
cp matpac_fast/trainer.py /tmp/trainer.py.orig
sed -i 's/vis, mask = vis.pin_memory(), mask.pin_memory()/pass  # mutation: pageable masks/' matpac_fast/trainer.py
grep -c 'mutation: pageable masks' matpac_fast/trainer.py > /dev/null || say "mutation: the pin_memory line was not found"
timeout -k 5 "$(cap 45)" $PY -m pytest -m gpu -p no:cacheprovider -rs tests/test_trainer.py \
  -k without_waiting_for_its_queue > "$L/mutation.log" 2>&1
say "mutation (pageable masks): pytest rc=$? (1 = the test fails on the old code) $(grep -E 'passed|failed' "$L/mutation.log" | tail -1)"
cp /tmp/trainer.py.orig matpac_fast/trainer.py

BEST=$(sort -k2 -g -r "$L/ab.txt" | head -1 | cut -d' ' -f1); BEST=${BEST:-base}
say "A/B at batch $B1: $(tr '\n' ' ' < "$L/ab.txt")-> best: $BEST"
ARGS[best]=${ARGS[$BEST]}
train best 210 $B2 60

c=$(cap 150)
if [ "$c" -ge 40 ]; then
  read -ra extra <<< "${ARGS[$BEST]}"
  # profile_step's compile mode is default (no CUDA graphs: the profiler sees each kernel), so gemm-autotune is given
  # as its GEMM options alone (its tuning results for batch 256 are in Inductor's local cache by now).
  [ "$BEST" = gemm1 ] && extra=(--inductor max_autotune_gemm=true --inductor "$RE")
  timeout -k 5 "$c" $PY benchmarks/profile_step.py "${PROF[@]}" --stream-dtype amp --top 30 "${extra[@]}" \
    > "$L/profile.log" 2>&1
  say "profile ($BEST) rc=$? $(grep -m1 '^RESULT' "$L/profile.log")"
  grep -v -i warn "$L/profile.log" | tail -80 > "$O/profile.txt"
fi
cp "$L/pytest.log" "$O/pytest.txt"; cat "$L/mutation.log" >> "$O/pytest.txt"
tar czf "$O/logs.tar.gz" -C /tmp s17logs
say "done"
