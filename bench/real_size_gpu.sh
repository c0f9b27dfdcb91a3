#!/usr/bin/env bash
# One GPU, every method at its real size (random weights, nothing downloaded): training
# throughput and peak memory of each, for extrapolating multi-GPU runs, then the FSDP tests.
#
#   bash bench/real_size_gpu.sh [OUT_DIR] [SECONDS] [NAME ...]
#
# Each bench gets its own time cap and the whole run stays within SECONDS (default 540); a
# bench that runs out of time is reported as such and the next one starts. Logs go to
# OUT_DIR (default bench-out/), one file per bench, and a summary of their last lines to
# OUT_DIR/summary.txt. NAMEs (shape_e otuken3d fsdp_tests deepspeed_tests voxel_vaegan lora_sd15
# mv_diffusion lora_sdxl) run only those. deepspeed_tests skip unless deepspeed is installed.
set -u
out=${1:-bench-out}
budget=${2:-540}
only=" ${*:3} "
mkdir -p "$out"
start=$(date +%s)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

step() {  # name, cap in seconds, command...
  local name=$1 cap=$2
  shift 2
  [[ "$only" == "  " || "$only" == *" $name "* ]] || return 0
  local left=$((budget - ($(date +%s) - start)))
  if ((left < 20)); then
    echo "$name: not run (time budget spent)" | tee -a "$out/summary.txt"
    return
  fi
  ((cap > left)) && cap=$left
  local t0
  t0=$(date +%s)
  timeout --kill-after=10 "$cap" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  local took=$(($(date +%s) - t0))
  {
    echo "== $name (exit $rc, ${took}s of ${cap}s)"
    grep -E "samples/s|steps/s|ms/step|peak|GiB|ratio:|passed|failed|Error|error|^(on|off) " "$out/$name.log" | tail -n 12
  } | tee -a "$out/summary.txt"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$out/summary.txt"
python3 -c "import torch; print('torch', torch.__version__)" >>"$out/summary.txt"
step shape_e 90 python3 bench/shape_e_step.py --real-size
step otuken3d 70 python3 bench/otuken3d_step.py --real-size
step fsdp_tests 170 python3 -m pytest -q -p no:cacheprovider tests/integration/test_scale_out.py -k fsdp
step deepspeed_tests 300 python3 -m pytest -q -p no:cacheprovider tests/integration/test_scale_out.py -k deepspeed
step voxel_vaegan 50 python3 bench/ddp_scaling.py --single-gpu-real-size --steps 30
step lora_sd15 70 python3 bench/lora_step.py --real-size sd15
step mv_diffusion 70 python3 bench/mv_step.py --real-size
step lora_sdxl 120 python3 bench/lora_step.py --real-size sdxl
