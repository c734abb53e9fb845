#!/usr/bin/env bash
# The GPU checks of issue 20 item 7, run on a lent H200 through the `device` tool:
#   run(command="bash benchmarks/device_h200.sh", carry=[".whl"], timeout_s=540)
# The machine's python3 has torch, Lightning and transformers but not diffusers or
# open_clip: they travel as wheels in .whl/ (see docs/log/2026-12-generator.md for the
# pip download line). Results land in $OUT (the tool brings them back).
set -uo pipefail
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
python3 -c "import torch, lightning, diffusers; print(torch.__version__, lightning.__version__, diffusers.__version__)"
python3 -c "import benchmarks.diffusion_throughput" || exit 2
# Eager, bf16-mixed, channels-last: 32 px (the tiny profile) and 64 px, three batch sizes.
timeout 270 python3 -m benchmarks.diffusion_throughput --resolution 32 64 --batch 32 256 1024 \
  --steps 50 --peak-tflops 989 --out "$OUT/eager.json" 2>&1 | grep -v -i "warn\|tip\|available" | tee "$OUT/eager.log"
# torch.compile of the same step at batch 256.
timeout 200 python3 -m benchmarks.diffusion_throughput --resolution 32 64 --batch 256 --steps 50 \
  --repeats 1 --compile --peak-tflops 989 --out "$OUT/compiled.json" 2>&1 | grep -v -i "warn\|tip\|available" | tee "$OUT/compiled.log"
