#!/usr/bin/env bash
# On the GPU machine: wait up to $1 seconds (default 560) for the bench that
# tools/gpu_bench_start.sh started, print the end of its log, and copy what it wrote to $OUT.
set -u
limit=${1:-560}
pid=$(cat /tmp/gpu-bench/pid)
end=$((SECONDS + limit))
while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $end ]; do sleep 5; done
kill -0 "$pid" 2>/dev/null && echo "bench still running" || echo "bench finished"
grep -v -e WARNING -e '^\s*$' /tmp/gpu-bench/bench.log | tail -n 60
[ -n "${OUT:-}" ] && cp /tmp/gpu-bench/*.json /tmp/gpu-bench/*.txt /tmp/gpu-bench/*.log "$OUT"/ 2>/dev/null
exit 0
