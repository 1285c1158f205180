#!/usr/bin/env bash
# The GPU checks in one call: CUDA kernel and network tests against NumPy and
# PyTorch, CUDA training on digits, `vggen bench` at B=64 and B=256 beside
# PyTorch, and compute-sanitizer's memcheck over a small training step.
# Usage (repository root, on a machine with a GPU): bash tools/gpu_check.sh [quick]
set -uo pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out="${OUT:-/tmp/vggen-gpu}"
mkdir -p "$out"
py=python3
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

echo "== CUDA tests"
$py -m pytest -rs -p no:cacheprovider tests/test_cuda_compile.py tests/test_runtime.py tests/test_network.py \
    2>&1 | tee "$out/tests.log" | tail -n 25

echo "== compute-sanitizer memcheck: one training step, width 4, batch 4"
compute-sanitizer --tool memcheck --print-limit 20 \
    $py -m vggen.cli bench --target cuda --batch-size 4 --width 4 --steps 1 --warmup 0 --no-torch \
    > "$out/memcheck.log" 2>&1
grep -E "ERROR SUMMARY|========= (Invalid|Error)" "$out/memcheck.log" | head -n 20

echo "== bench B=64 and B=256, width 64"
for b in 64 256; do
    $py -m vggen.cli bench --target cuda --batch-size "$b" --width 64 --json > "$out/bench$b.json" \
        2> "$out/bench$b.err" || tail -n 5 "$out/bench$b.err"
    $py - "$out/bench$b.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"B={r['batch_size']}: vggen {r['images_per_s']:.0f} img/s, PyTorch {r['torch_images_per_s'] or 0:.0f} img/s, "
      f"ratio {r['ratio'] or 0:.3f} on {r['device']}")
for k in r["kernels"][:8]:
    print(f"   {k['name']:45s} {k['seconds']*1e3:8.3f} ms {k['share']:6.1%} {k['flops']/max(k['seconds'],1e-12)/1e9:8.1f} GFLOP/s")
PY
done

[ "${1:-}" = quick ] && exit 0
echo "== train: cuda, digits, width 64"
$py -m vggen.cli train --target cuda --dataset digits --width 64 --epochs 10 --seed 0 \
    --metrics "$out/digits_cuda_w64.jsonl" 2>&1 | tr '\r' '\n' | grep -vE "^\s*epoch .*\|.*it/s|^$" | tail -n 14
tail -n 1 "$out/digits_cuda_w64.jsonl"
