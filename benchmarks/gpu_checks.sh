#!/bin/bash
# Issue 11's GPU figures in one sitting, each part bounded by what is left of DEADLINE seconds (a lent GPU is
# short of time, not memory), most wanted first. Prints everything and keeps it in $OUT/log.txt.
#
#   EXAMPLES=DIR [EXTRA_SITE=DIR] [TOKENIZER=DIR] [DEADLINE=580] [OUT=DIR] bash benchmarks/gpu_checks.sh
#
# EXAMPLES: a folder with diffusers' examples/textual_inversion/textual_inversion.py (edits: shared/reference/
# peers.md); EXTRA_SITE: put first on PYTHONPATH (e.g. a copy of diffusers where it is not installed);
# TOKENIZER: a tokenizer folder peer_models.py wrote before (writing one takes a while). DRY=1 runs every part
# with tiny shapes on any machine (PY=python, PEER_EXTRA='--peers-python P --stub S' where the example needs them).
#
# Parts: B1 SD 1.5 512 px batch 32 bf16, images/s and a kernel profile; C one concept end to end (3000 steps x 4
# images, configs/sd15.yaml without remat: 140 GB need none), cold and warm cache; E the PyTorch example on the
# same model and batch, bf16; D 16 concepts in one run; B2 cuBLAS for every matmul; V batch 4 without XLA
# autotuning (compile time); F SDXL 1024 px batch 4 bf16 + remat.
T0=$(date +%s)
DEADLINE=${DEADLINE:-580}
OUT=${OUT:-gpu-checks-out}
mkdir -p "$OUT"
left() { echo $(( DEADLINE - ($(date +%s) - T0) )); }
# part CAP CMD...: CMD for at most CAP seconds and not past the deadline; skipped with under 20 s left.
part() { local c=$1 l; shift; l=$(left); [ "$l" -lt 20 ] && { echo "skipped (deadline): $*"; return; }
         [ "$c" -gt "$l" ] && c=$l; timeout "$c" "$@"; echo "(status $?)"; }
stamp() { echo "== [$(( $(date +%s) - T0 )) s] $*"; }
exec > >(tee -a "$OUT/log.txt") 2>&1
export PYTHONPATH=${EXTRA_SITE:+$EXTRA_SITE:}$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
    TQDM_DISABLE=1
M=$(mktemp -d)
if [ -n "$DRY" ]; then TS=tiny PM=small RES=64 BIG=2 ONE="--steps 20" LOGE=5 MANY=3 MSTEPS=30 PY=${PY:-python3}
else TS=sd15 PM=sd15 RES=512 BIG=32 ONE="" LOGE=50 MANY=16 MSTEPS=60 PY=${PY:-python3}; fi

stamp setup
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null
$PY -c "import jax; print('jax', jax.__version__, jax.devices())"
($PY benchmarks/peer_models.py $PM --no-flax ${TOKENIZER:+--tokenizer $TOKENIZER} --out "$M" > "$OUT/models.log" 2>&1
 echo "models status $? at $(( $(date +%s) - T0 )) s" >> "$OUT/models.log") &
BUILD=$!

stamp "B1: SD 1.5 shapes, $RES px, batch $BIG, bf16: images/s and where the device's time goes"
part 150 $PY benchmarks/train_step.py --model $TS --resolution $RES --batch $BIG --dtype bfloat16 --steps 10 \
    --profile "$M/profile"
wait $BUILD; tail -2 "$OUT/models.log"

stamp "C: one concept end to end, 3000 steps x 4 images"
part 230 $PY benchmarks/one_concept.py --model "$M/$PM" --images "$M/images" --images-per-step 4 --log-every $LOGE \
    --work "$M/one" -- --config configs/sd15.yaml --set remat=false --validate-every 0 --init cat --resolution $RES $ONE

stamp "E: diffusers textual_inversion.py (PyTorch, bf16 autocast), same model, batch 4"
part 120 $PY benchmarks/peers.py --examples "$EXAMPLES" --model "$M/$PM" --images "$M/images" --resolution $RES \
    --batch 4 --steps 20 120 --repeats 1 --programs pytorch --peer-args='--mixed_precision bf16' --logs "$M/peers" \
    $PEER_EXTRA

stamp "D: $MANY concepts in one run, $MSTEPS steps x 4 images each (separate runs: from C's start-up and step)"
part 190 $PY benchmarks/many_concepts.py --concepts $MANY --steps $MSTEPS --separate 0 --images-per-concept 4 \
    --model "$M/$PM" -- --config configs/sd15.yaml --set remat=false --resolution $RES --init cat

stamp "B2: as B1 with cuBLAS for every matmul (no Triton GEMMs)"
part 110 $PY benchmarks/train_step.py --model $TS --resolution $RES --batch $BIG --dtype bfloat16 --steps 10 \
    --xla xla_gpu_enable_triton_gemm=false

stamp "V: batch 4 without XLA's autotuning: compile time against C's"
part 150 $PY benchmarks/train_step.py --model $TS --resolution $RES --batch 4 --dtype bfloat16 --steps 20 \
    --xla xla_gpu_autotune_level=0

stamp "F: SDXL 1024 px batch 4 bf16 + remat"
[ -z "$DRY" ] && part 240 $PY benchmarks/train_step.py --model sdxl --resolution 1024 --batch 4 --dtype bfloat16 \
    --remat --steps 5
stamp done
tar czf "$OUT/logs.tgz" -C "$M" one/cold.log one/warm.log peers 2>/dev/null
rm -rf "$M"
