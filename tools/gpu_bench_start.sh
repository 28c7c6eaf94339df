#!/usr/bin/env bash
# On a lent GPU machine, once ../shared/gpu/README.md's staging has installed vLLM into
# /tmp/site: install otel-moe offline from a copy of this tree and start the GPU throughput
# bench in the background, in a process group of its own (it outlasts one device call, and the
# machine keeps it running between calls). Then poll with tools/gpu_bench_wait.sh.
#   bash tools/gpu_bench_start.sh --rounds 14 --keep-awake alternate
#   bash tools/gpu_bench_start.sh --serve --rounds 4 --request-rate 150   (tools.bench_serve)
set -euo pipefail
export PYTHONPATH=/tmp/site
rm -rf /tmp/repo /tmp/gpu-bench && mkdir -p /tmp/repo /tmp/gpu-bench
tar --exclude=./.gpu --exclude=./.venv --exclude=./.git -cf - . | tar -xf - -C /tmp/repo
cd /tmp/repo
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/tmp/gpu-bench/install.log 2>&1
{ nvidia-smi; lscpu; cat /sys/devices/system/cpu/cpu*/topology/thread_siblings_list | sort -u | tr '\n' ' '; } \
  >/tmp/gpu-bench/machine.txt 2>&1 || true
if [ "${1:-}" = --serve ]; then
  shift
  bench=(-m tools.bench_serve --out /tmp/gpu-bench/gpu_serve_results.json)
else
  bench=(-m tools.bench --device cuda --sections vllm --out /tmp/gpu-bench/gpu_results.json)
fi
PYTHONUNBUFFERED=1 setsid nohup python3 "${bench[@]}" "$@" >/tmp/gpu-bench/bench.log 2>&1 </dev/null &
echo $! >/tmp/gpu-bench/pid
echo "bench started (pid $(cat /tmp/gpu-bench/pid)); log: /tmp/gpu-bench/bench.log"
