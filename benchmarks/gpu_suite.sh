#!/usr/bin/env bash
# The zero-shot comparison of one short GPU lease: every job at once on one GPU, stopped at a deadline.
#
# Usage: SADAG_SHARED=/path/to/shared [PYTHON=python3] benchmarks/gpu_suite.sh OUT_DIR [DEADLINE_SECONDS] [PLAN]
# PLAN "lease3" (one <= 9 minute H200 lease, DEADLINE_SECONDS default 560): benchmarks/protocol.py on ResNet-20 W2A2
# after benchmarks/throughput.py --device cuda --units 2 --lower-precision alone (at most 170 s; adds bf16 Genie-D
# and TF32 reconstruction rows): real, genie, sadag, sadag-pass, genie-bf16, genie-lowpass x seeds 0-4, 30 processes under MPS
# (SADAG starts when its seed's genie set is written), eager reconstruction, until 25 s before the deadline. OUT_DIR gets protocol_resnet20_cifar10_h200.json,
# throughput_cuda.json, the logs and the runs' reports (protocol_reports.tgz).
# PLAN "throughput" (one <= 9 minute H200 lease, DEADLINE_SECONDS default 510 there): (a) benchmarks/throughput.py
# --device cuda (reference vs fast engines, about 2 minutes), then (b) ResNet-20 SADAG W4A4 at the `paper` preset
# end to end with the fast engines (gen.parallel_batches and calib.engine at their auto defaults: all batches in
# one pass, compiled reconstruction steps) until the deadline; OUT_DIR gets throughput_cuda.json, the run's
# report (or, cut short, its metrics.jsonl: the fraction done per stage) and paper_r20.json with the seconds.
# PLAN "scale" (issue 13, about 5 minutes): benchmarks/scaling.py measure --device cuda --ranks 4 under MPS (1
# process against 4 torchrun ranks sharing the GPU, SADAG_SHARE_GPU=1, exact and wide split); OUT_DIR gets
# scaling_cuda.json and the log.
# PLAN "lease" (default) runs steps 1-4 below; "rest" (for what is left of a lease after "lease") skips
# steps 1-2 and runs ResNet-20 seed 0 at the peer budget (genie, sadag-random; W4A4, W2A4) and
# EfficientNet-Lite0 at the `tiny` budget (genie, sadag-random; W4A4, W2A4). "sadag" is sized from what
# those two measured (a ResNet-20 SADAG chain, Genie-D to the end of one calibration, took about 380 s among
# 17 jobs): the ResNet-20 smoke run, then genie and sadag-random x seeds 0 1 2 x W4A4 W2A4 at the peer budget.
# "final" is "sadag" plus EfficientNet-Lite0 at `tiny` (genie, sadag-random; W4A4, W3A3) and
# three of benchmarks/genie_collapse.py's Genie-D variants on EfficientNet-Lite0 (traced, then calibrated W4A4).
#   1. a CUDA smoke run of zeroq and sadag (Genie-D, stage B, refinement, calibration) on ResNet-20 (32x32)
#      and EfficientNet-Lite0 (224x224);
#      the suite stops there if one fails;
#   2. benchmarks/step_cost.py on the GPU, alone (Genie-D step vs SADAG refinement step);
#   3. in parallel: ResNet-20 at the peer budget (genie, sadag-random, sadag-adversarial x seeds 0 1 2,
#      W4A4 W3A3 W2A4), ResNet-56 at the peer budget and EfficientNet-Lite0 at the `short` budget
#      (genie, sadag-random, seed 0, W4A4 and W2A4);
#   4. at the deadline the jobs still running are stopped; the tables of what finished are printed and
#      OUT_DIR gets the results JSON, the logs, every run's report and the 32x32 sets.
# Stage seconds measured here are of jobs sharing one GPU and 16 cores: compare them only with each other.
set -u
out=$(realpath -m "$1"); deadline=${2:-480}; plan=${3:-lease}
py=${PYTHON:-python}
mps_on() {  # many small processes share the GPU: MPS runs their kernels side by side instead of time-sliced
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps_pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps_log
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  if nvidia-cuda-mps-control -d 2>/dev/null && timeout 60 "$py" -c "import torch; torch.ones(1, device='cuda').sum().item()"
  then echo "MPS on"; else echo quit | nvidia-cuda-mps-control 2>/dev/null; echo "MPS off"; fi
}
mps_off() { echo quit | nvidia-cuda-mps-control 2>/dev/null; sleep 2; }
if [ "$plan" = scale ]; then
  mkdir -p "$out"; mps_on
  timeout -k 5 "$deadline" "$py" benchmarks/scaling.py measure --device cuda --ranks 4 2>&1 | tee "$out/scaling.log"
  mps_off; cp benchmarks/results/scaling_cuda.json "$out"/ 2>/dev/null
  exit 0
fi
if [ "$plan" = throughput ] || [ "$plan" = lease3 ]; then
  deadline=${2:-560}; mkdir -p "$out"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  echo "== throughput at $SECONDS s"  # alone on the GPU: reference vs fast engines, same seeds
  tp_limit=$([ "$plan" = lease3 ] && echo 170 || echo $((deadline - SECONDS - 10)))
  # --unit-repeats 1: every repeat of a compiled engine compiles again (a fresh copy of the unit)
  timeout -k 5 "$tp_limit" "$py" benchmarks/throughput.py --device cuda --threads 4 --units 2 --unit-repeats 1 \
      --lower-precision \
      2>&1 | tee "$out/throughput.log"
  cp benchmarks/results/throughput_cuda.json "$out"/ 2>/dev/null
  if [ "$plan" = lease3 ]; then
    # issue 14's paired protocol where real data has headroom (W2A2), 5 seeds, one process per run under MPS
    proto=(--model resnet20_cifar10 --bits 2/2 --seeds 0 1 2 3 4 --work /tmp/sadag_protocol --tag h200)
    mps_on
    echo "== protocol at $SECONDS s"
    timeout -k 5 $((deadline - 25 - SECONDS)) "$py" benchmarks/protocol.py "${proto[@]}" --methods real genie sadag sadag-pass genie-bf16 genie-lowpass \
        --jobs 30 --device cuda --engine eager --threads 1 >"$out/protocol.log" 2>&1
    pkill -f benchmarks/protocol.py; sleep 2; mps_off
    "$py" benchmarks/protocol.py "${proto[@]}" --collect 2>&1 | tee "$out/protocol_collect.log"
    cp benchmarks/results/protocol_resnet20_cifar10_h200.json "$out"/ 2>/dev/null
    tar czf "$out/protocol_reports.tgz" -C /tmp sadag_protocol --exclude='*.pt' --exclude='*.safetensors' 2>/dev/null
  fi
  if [ "$plan" = throughput ]; then
    left=$((deadline - SECONDS - 15)); run=/tmp/sadag_paper_r20; rm -rf "$run"
    echo "== ResNet-20 SADAG W4A4 paper preset from $SECONDS s, $left s left"
    start=$SECONDS
    timeout "$left" "$py" -m sadag run --model resnet20_cifar10 \
        --weights "$SADAG_SHARED/weights/cifar10-resnet/resnet20-12fca82f.th" --method sadag --bits 4/4 \
        --preset paper --eval-data "$SADAG_SHARED/data/cifar10-jpeg/test" --device cuda --threads 4 --out "$run" \
        >"$out/paper_r20.log" 2>&1
    rc=$?; sec=$((SECONDS - start))
    echo "{\"seconds\": $sec, \"exit_code\": $rc, \"finished\": $([ $rc = 0 ] && echo true || echo false)}" \
        >"$out/paper_r20.json"
    cp "$run"/report.* "$run"/metrics.jsonl "$out"/ 2>/dev/null
    tail -5 "$out/paper_r20.log"; cat "$out/paper_r20.json"
  fi
  echo "== done at $SECONDS s"
  exit 0
fi
case $plan in
  lease) smoke=full effnet=short r56=1 r20_seeds="0 1 2" r20_bits="4/4 3/3 2/4" split=0
         r20_methods="genie sadag-random sadag-adversarial" ;;
  rest) smoke=none effnet=tiny r56=0 r20_seeds=0 r20_bits="4/4 2/4" split=1 r20_methods="genie sadag-random" ;;
  sadag) smoke=r20 effnet= r56=0 r20_seeds="0 1 2" r20_bits="4/4 2/4" split=1 r20_methods="genie sadag-random" ;;
  final) smoke=r20 effnet=tiny effnet_bits="4/4 3/3" r56=0 r20_seeds="0 1 2" r20_bits="4/4 2/4" split=1
         r20_methods="genie sadag-random" collapse="base lr_z_0.01 lr_g_0.001" ;;
  *) echo "unknown plan '$plan': scale, lease3, throughput, lease, rest, sadag or final"; exit 2 ;;
esac
effnet_bits=${effnet_bits:-4/4 2/4}; collapse=${collapse:-}
work=/tmp/sadag_gpu_suite; logs=$out/logs; stop=$out/STOP
mkdir -p "$logs" "$work"
zs() { "$py" benchmarks/zero_shot.py --threads 1 --work "$work" "$@"; }
stopped() { [ -e "$stop" ]; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

mps_on

if [ "$smoke" != none ]; then
echo "== smoke (CUDA path of every method)"
zs --budget smoke --seeds 0 --bits 4/4 --methods zeroq sadag-adversarial \
   --work /tmp/sadag_smoke >"$logs/smoke_r20.log" 2>&1 || { tail -40 "$logs/smoke_r20.log"; exit 1; }
fi
if [ "$smoke" = full ]; then
zs --model efficientnet_lite0 --budget smoke --seeds 0 --bits 4/4 --methods sadag-random \
   --work /tmp/sadag_smoke >"$logs/smoke_effnet.log" 2>&1 || { tail -40 "$logs/smoke_effnet.log"; exit 1; }
grep -h quant_top1 "$logs"/smoke_*.log

echo "== step cost at $SECONDS s"
"$py" benchmarks/step_cost.py --device auto --threads 1 --k1 10 --k2 60 2>&1 | tee "$logs/step_cost.log"
fi

# One process generates a (model, method, seed) set, then calibrations start in the background.
chain() {  # model budget seed "bits..." per-bits(0|1) methods...
  local model=$1 budget=$2 seed=$3 bits=$4 split=$5; shift 5
  local m b tag
  for m in "$@"; do
    stopped && break
    tag=${model%%_*}_${m}_s$seed
    zs --model "$model" --budget "$budget" --seeds "$seed" --methods "$m" --generate-only \
       >"$logs/gen_$tag.log" 2>&1 || break
    if [ "$split" = 1 ]; then
      for b in $bits; do
        zs --model "$model" --budget "$budget" --seeds "$seed" --methods "$m" --bits "$b" \
           >"$logs/cal_${tag}_w${b/\//a}.log" 2>&1 &
      done
    else
      # shellcheck disable=SC2086
      zs --model "$model" --budget "$budget" --seeds "$seed" --methods "$m" --bits $bits >"$logs/cal_$tag.log" 2>&1 &
    fi
  done
  wait
}

echo "== jobs from $SECONDS s, deadline $deadline s"
# the watchdog stops this suite's jobs only (matched by their --work folder)
( sleep $((deadline - SECONDS)); touch "$stop"; pkill -f -- "--work $work" ) &
watchdog=$!
pids=()
for v in $collapse; do
  "$py" benchmarks/genie_collapse.py --variant "$v" --work "$work/collapse" >"$logs/collapse_$v.log" 2>&1 &
  pids+=($!)
done
[ "$r56" = 1 ] && { chain resnet56_cifar10 peer 0 "4/4 2/4" 1 genie sadag-random & pids+=($!); }
[ -n "$effnet" ] && { chain efficientnet_lite0 "$effnet" 0 "$effnet_bits" 1 genie sadag-random & pids+=($!); }
for seed in $r20_seeds; do
  # shellcheck disable=SC2086
  chain resnet20_cifar10 peer "$seed" "$r20_bits" "$split" $r20_methods & pids+=($!)
done
wait "${pids[@]}"
kill "$watchdog" 2>/dev/null
echo "== jobs ended at $SECONDS s"

rm -f benchmarks/results/zero_shot_*_smoke.json
# shellcheck disable=SC2086
zs --budget peer --seeds $r20_seeds --methods $r20_methods --bits $r20_bits --collect
[ "$r56" = 1 ] && zs --model resnet56_cifar10 --budget peer --seeds 0 --methods genie sadag-random --bits 4/4 2/4 --collect
# shellcheck disable=SC2086
[ -n "$effnet" ] && zs --model efficientnet_lite0 --budget "$effnet" --seeds 0 --methods genie sadag-random \
                       --bits $effnet_bits --collect
[ -n "$collapse" ] && "$py" benchmarks/genie_collapse.py --collect
cp benchmarks/results/zero_shot_*_peer.json "$out"/
[ -n "$effnet" ] && cp benchmarks/results/zero_shot_*_"$effnet".json "$out"/
[ "$smoke" = full ] && cp benchmarks/results/step_cost_*_cuda.json "$out"/
# Archives, each under the 16 MB a file may have on its way back: reports, metrics and logs;
# the 32x32 sets of each method (3 MB a set); the image grids of the 224x224 sets (6 MB each). No checkpoints.
tar -czf "$out/reports.tgz" --exclude=state --exclude='*.pt' --exclude='*.png' \
    -C "$(dirname "$work")" "$(basename "$work")" -C "$out" logs
# one archive per method: six 32x32 sets in one went over the limit in lease 2
for m in $r20_methods; do
  (cd "$work" && tar -czf "$out/sets_32px_$m.tgz" --exclude=state sets/resnet*_"${m}"_* 2>/dev/null)
done
(cd "$work" && tar -czf "$out/grids_224px.tgz" sets/efficientnet*/grid.png 2>/dev/null)
[ -n "$collapse" ] && tar -czf "$out/collapse.tgz" benchmarks/results/genie_collapse_*.json
rm -rf "$logs"
echo quit | nvidia-cuda-mps-control 2>/dev/null
echo "== done at $SECONDS s"
