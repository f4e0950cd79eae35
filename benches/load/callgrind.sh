#!/usr/bin/env bash
# Instructions per proxied request, user space, under callgrind: the steady counterpart of the
# load harness's CPU µs per request on this noisy shared machine (issue #15). Documented in
# BENCHMARKS.md.
#
# For each contender: an nginx origin answering 200 "ok\n" on a free 127.0.0.1 port, the proxy
# under `valgrind --tool=callgrind` with instrumentation off, wrk warms it up (2 s), it is
# switched on (`callgrind_control -i on`), wrk sends load for SECONDS over C (default 1: the steadiest count; more connections batch more requests per wakeup, by how busy the machine is) keep-alive
# connections with the harness's key rotation (benches/load/keys.lua, 1,000 keys), it is
# switched off, and the collected instructions (all threads, and the busiest thread alone) are
# divided by the requests wrk completed. The
# wrk process and the origin are not measured. Every process started here is stopped by PID.
#
# Contenders: fairgate-empty, fairgate-full (release gateway, 1 worker, thread_per_core, decision
# log off, as in run.sh), hyper (benches' minimal proxy on hyper-util's legacy Client),
# hyper-conn (the same on its own hyper::client::conn::http1 pool), fairgate-reject (the full
# policy with every request from the 1,000 `throttled-*` keys: after an 8 s warm-up has spent
# their bursts, each is a 429; the instructions of a rejection beside those of an admit).
#
# usage: benches/load/callgrind.sh [--seconds S] [--connections C] [--no-build] [CONTENDER...]
#        FAIRGATE_BIN=/path/to/fairgate benches/load/callgrind.sh fairgate-full   # an A/B
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
SECONDS_LOAD=5
CONNECTIONS=1
BUILD=1
CONTENDERS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --seconds) SECONDS_LOAD="$2"; shift 2 ;;
        --connections) CONNECTIONS="$2"; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        -h|--help) sed -n 2,22p "$0"; exit 0 ;;
        *) CONTENDERS+=("$1"); shift ;;
    esac
done
[ ${#CONTENDERS[@]} -gt 0 ] || CONTENDERS=(hyper hyper-conn fairgate-empty fairgate-full)

for tool in valgrind wrk nginx; do
    command -v "$tool" >/dev/null || { echo "callgrind.sh: $tool is missing (apt-get install -y valgrind wrk nginx)" >&2; exit 1; }
done
if [ "$BUILD" = 1 ]; then
    (cd "$ROOT" && nice -n 19 cargo build --release -q -p fairgate-gateway -p fairgate-benches --bin fairgate --bin hyper_proxy)
fi
FAIRGATE="${FAIRGATE_BIN:-$ROOT/target/release/fairgate}"
HYPER="$ROOT/target/release/hyper_proxy"

RUN="$(mktemp -d /tmp/fairgate-callgrind.XXXXXX)"
PIDS=()
cleanup() {
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        kill "${PIDS[$i]}" 2>/dev/null || true
        wait "${PIDS[$i]}" 2>/dev/null || true
    done
}
trap cleanup EXIT

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
wait_port() { # wait_port PORT PID
    local i
    for i in $(seq 600); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        kill -0 "$2" 2>/dev/null || { echo "callgrind.sh: process $2 exited" >&2; return 1; }
        sleep 0.1
    done
    echo "callgrind.sh: port $1 never opened" >&2
    return 1
}

ORIGIN_PORT=$(free_port)
cat >"$RUN/origin.conf" <<EOF
daemon off;
worker_processes 1;
error_log $RUN/origin.err warn;
pid $RUN/origin.pid;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 100000000;
    server {
        listen 127.0.0.1:$ORIGIN_PORT backlog=4096;
        location / { default_type text/plain; return 200 "ok\n"; }
    }
}
EOF
nginx -e "$RUN/origin.err" -c "$RUN/origin.conf" &
PIDS+=($!)
wait_port "$ORIGIN_PORT" "${PIDS[-1]}"

gateway_conf() { # gateway_conf PORT POLICY
    cat >"$RUN/gateway-$2.yaml" <<EOF
listen: 127.0.0.1:$1
workers: 1
runtime: thread_per_core
routes:
  - name: all
    path_prefix: /
    upstream: origin
upstreams:
  origin:
    targets: [127.0.0.1:$ORIGIN_PORT]
policy: $HERE/policy-$2.yaml
log:
  decisions: "off"
  level: warn
EOF
    echo "$RUN/gateway-$2.yaml"
}

printf '| contender | requests | instructions per request | of which the serving thread |\n|---|--:|--:|--:|\n'
for name in "${CONTENDERS[@]}"; do
    port=$(free_port)
    out="$RUN/callgrind.$name.out"
    reject=0 warm=2
    vg=(valgrind --tool=callgrind --instr-atstart=no --separate-threads=yes --callgrind-out-file="$out")
    case "$name" in
        fairgate-empty) cmd=("$FAIRGATE" run --config "$(gateway_conf "$port" empty)") ;;
        fairgate-full) cmd=("$FAIRGATE" run --config "$(gateway_conf "$port" full)") ;;
        fairgate-reject) cmd=("$FAIRGATE" run --config "$(gateway_conf "$port" full)"); reject=100; warm=8 ;;
        hyper) export HYPER_PROXY_POOL=legacy; cmd=("$HYPER" "127.0.0.1:$port" "127.0.0.1:$ORIGIN_PORT" 1) ;;
        hyper-conn) export HYPER_PROXY_POOL=conn; cmd=("$HYPER" "127.0.0.1:$port" "127.0.0.1:$ORIGIN_PORT" 1) ;;
        *) echo "callgrind.sh: unknown contender $name" >&2; exit 2 ;;
    esac
    "${vg[@]}" "${cmd[@]}" >"$RUN/$name.log" 2>&1 &
    pid=$!
    PIDS+=("$pid")
    wait_port "$port" "$pid"
    wrk -t 1 -c "$CONNECTIONS" -d "${warm}s" -s "$HERE/keys.lua" "http://127.0.0.1:$port/" -- "$reject" 1000 >/dev/null
    callgrind_control -i on "$pid" >/dev/null 2>&1
    wrk -t 1 -c "$CONNECTIONS" -d "${SECONDS_LOAD}s" -s "$HERE/keys.lua" "http://127.0.0.1:$port/" -- "$reject" 1000 >"$RUN/$name.wrk"
    callgrind_control -i off "$pid" >/dev/null 2>&1
    requests=$(awk '/requests in/ {print $1}' "$RUN/$name.wrk")
    rejected=$(awk '/Non-2xx/ {print $NF}' "$RUN/$name.wrk")
    if [ "$reject" = 100 ] && [ "${rejected:-0}" != "$requests" ]; then
        echo "callgrind.sh: $name: ${rejected:-0} of $requests requests rejected; the warm-up did not spend every key's burst" >&2
    fi
    kill -TERM "$pid"
    wait "$pid" 2>/dev/null || true
    # One file per thread: all of them (the process's cost), and the busiest one (the thread
    # serving the connections; the rest is background work that grows with wall time).
    read -r ir busiest < <(awk '/^totals:/ {t += $2; if ($2 > m) m = $2} END {print t, m}' "$out"-*)
    printf '| %s | %s | %s | %s |\n' "$name" "$requests" "$(( ir / requests ))" "$(( busiest / requests ))"
done
echo
echo "callgrind profiles: $RUN/callgrind.*.out (callgrind_annotate --inclusive=yes FILE)"
