#!/usr/bin/env bash
# What the threads worker (lb/threads/worker.py: JSON on gunicorn's errors, LB_CLIENT_TIMEOUT)
# costs next to plain gthread: one lb-run stack (N replicas, the balancer on PORT_A), a second
# balancer with --worker-class gthread on PORT_B over the same registry and replicas, then wrk
# against each in turn, ROUNDS times, alternating which goes first. Loopback only; bounded.
#   bench/worker_ab.sh            (ROUNDS=4 SECONDS_PER_RUN=8 CONNECTIONS=16 to change them)
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-4}
SECONDS_PER_RUN=${SECONDS_PER_RUN:-8}
CONNECTIONS=${CONNECTIONS:-16}
PORT_A=${PORT_A:-5601}
PORT_B=${PORT_B:-5602}
command -v wrk >/dev/null || { echo "worker_ab: needs wrk (apt-get install wrk)" >&2; exit 1; }

work=$(mktemp -d)
export LB_DEPLOYMENT="workerab$$" LB_REGISTRY="$work/registry.json" LB_LOG_LEVEL=warning LB_WORKER=threads
LB_PORT=$PORT_A .venv/bin/lb-run >"$work/lb-run.log" 2>&1 &
stack=$!
plain=""
cleanup() {
    [ -n "$plain" ] && kill "$plain" 2>/dev/null && wait "$plain" 2>/dev/null
    kill -INT "$stack" 2>/dev/null && wait "$stack" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT

serving() {
    for _ in $(seq 120); do
        curl -sf "http://127.0.0.1:$1/home" >/dev/null && return 0
        sleep 0.5
    done
    echo "worker_ab: nothing serves on port $1" >&2
    exit 1
}
serving "$PORT_A"
LB_PORT=$PORT_B .venv/bin/python -m gunicorn -c python:lb.gunicorn_conf \
    --worker-class gthread >"$work/gthread.log" 2>&1 &
plain=$!
serving "$PORT_B"

echo "round worker req/s p99"
for round in $(seq "$ROUNDS"); do
    order="$PORT_A $PORT_B"
    [ $((round % 2)) -eq 0 ] && order="$PORT_B $PORT_A"
    for port in $order; do
        out=$(wrk -t2 -c"$CONNECTIONS" -d"${SECONDS_PER_RUN}s" --latency "http://127.0.0.1:$port/home")
        rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
        p99=$(awk '$1 == "99%" {print $2}' <<<"$out")
        errors=$(grep -E "Non-2xx|Socket errors" <<<"$out" || true)
        name=lb.threads.worker
        [ "$port" = "$PORT_B" ] && name=gthread
        echo "$round $name $rps $p99 $errors"
    done
done | tee "$work/rounds.txt"
awk '$2 == "lb.threads.worker" {a += $3; n++} $2 == "gthread" {b += $3; m++}
     END {printf "mean req/s: lb.threads.worker %.0f, gthread %.0f, ratio %.3f\n", a / n, b / m, (a / n) / (b / m)}' \
    "$work/rounds.txt"
