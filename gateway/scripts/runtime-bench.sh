#!/usr/bin/env bash
# Compares the gateway's two runtime models (`runtime: multi_thread` and `thread_per_core`)
# with wrk on 127.0.0.1, behind an nginx origin answering 200 "ok\n".
#
#   pinned:   `workers: 1`, the gateway on core 0 (taskset -c 0); nginx and wrk on core 1
#   unpinned: `workers: 2`, nothing pinned
#
# Each point: start the gateway (empty policy, decision log off), 2 s of warm-up load, then
# DURATION s measured (wrk -t1 -c CONNECTIONS --latency) while the gateway's CPU time (all its
# threads, from /proc/PID/stat) is counted, then SIGTERM. Rounds interleave the two models;
# the table shows the median of RUNS rounds. Before each point the script waits
# (up to QUIET_WAIT s) for the machine to be idle, since other tenants share it; the busy
# share it saw is printed last on each raw line
# (mode runtime run rps p50_us p99_us cpu_us_per_request busy%). Every process it starts is stopped by its PID.
#
# usage: gateway/scripts/runtime-bench.sh   (env: FAIRGATE_BIN, RUNS=3, DURATION=10,
#        CONNECTIONS=64, MODES="pinned unpinned", QUIET_WAIT=60, NICE=-10 as root)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
BIN="${FAIRGATE_BIN:-$ROOT/target/release/fairgate}"
RUNS="${RUNS:-3}"
DURATION="${DURATION:-10}"
CONNECTIONS="${CONNECTIONS:-64}"
MODES="${MODES:-pinned unpinned}"
QUIET_WAIT="${QUIET_WAIT:-60}"
# Niceness of the gateway, nginx and wrk: -10 as root (as benches/load/run.sh does), so that
# other tenants' builds interfere less; 0 otherwise.
if [ "$(id -u)" = 0 ]; then NICE="${NICE:--10}"; else NICE="${NICE:-0}"; fi
if [ "$DURATION" -gt 10 ]; then echo "DURATION is at most 10 s" >&2; exit 2; fi
for tool in wrk nginx taskset python3; do
    command -v "$tool" >/dev/null || { echo "missing $tool (apt-get install wrk nginx)" >&2; exit 2; }
done
[ -x "$BIN" ] || { echo "$BIN not built: cargo build --release -p fairgate-gateway" >&2; exit 2; }

WORK="$(mktemp -d)"
PIDS=()
cleanup() {
    local p
    for p in "${PIDS[@]}"; do
        kill "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done
    rm -rf "$WORK"
}
trap cleanup EXIT

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Busy share of all cores over one second, in percent.
busy_percent() {
    local a b
    a=($(head -1 /proc/stat))
    sleep 1
    b=($(head -1 /proc/stat))
    local idle=$(( (b[4] + b[5]) - (a[4] + a[5]) )) total=0 i
    for i in 1 2 3 4 5 6 7 8; do total=$(( total + b[i] - a[i] )); done
    echo $(( total > 0 ? 100 * (total - idle) / total : 0 ))
}

wait_quiet() {
    local waited=0 busy
    busy=$(busy_percent)
    while [ "$busy" -gt 15 ] && [ "$waited" -lt "$QUIET_WAIT" ]; do
        sleep 2
        waited=$(( waited + 3 ))
        busy=$(busy_percent)
    done
    echo "$busy"
}

# The origin: one nginx process answering 200 "ok\n".
UP_PORT="$(free_port)"
mkdir -p "$WORK/nginx"
cat >"$WORK/nginx.conf" <<EOF
daemon off;
master_process off;
worker_processes 1;
pid $WORK/nginx.pid;
error_log $WORK/nginx.err warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $WORK/nginx;
    proxy_temp_path $WORK/nginx;
    fastcgi_temp_path $WORK/nginx;
    uwsgi_temp_path $WORK/nginx;
    scgi_temp_path $WORK/nginx;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    server {
        listen 127.0.0.1:$UP_PORT backlog=4096;
        location / { default_type text/plain; return 200 "ok\n"; }
    }
}
EOF

start_nginx() { # start_nginx PIN
    $1 nginx -e "$WORK/nginx.err" -c "$WORK/nginx.conf" &
    NGINX_PID=$!
    PIDS+=("$NGINX_PID")
    local i
    for i in $(seq 100); do
        if python3 -c "import socket; socket.create_connection(('127.0.0.1', $UP_PORT), 1)" 2>/dev/null; then
            return 0
        fi
        sleep 0.1
    done
    echo "nginx did not start" >&2
    exit 1
}

stop_pid() {
    kill -TERM "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
    local keep=() p
    for p in "${PIDS[@]}"; do [ "$p" = "$1" ] || keep+=("$p"); done
    PIDS=("${keep[@]}")
}

# start_gateway RUNTIME WORKERS PIN: sets GW_PID and GW_PORT
start_gateway() {
    local runtime="$1" workers="$2" pin="$3" cfg="$WORK/gateway-$1.yaml" log="$WORK/gateway-$1.log"
    cat >"$cfg" <<EOF
listen: 127.0.0.1:0
runtime: $runtime
workers: $workers
routes: [{name: all, upstream: origin}]
upstreams:
  origin: {targets: [127.0.0.1:$UP_PORT]}
log: {decisions: "off", level: warn}
EOF
    $pin "$BIN" run --config "$cfg" 2>"$log" &
    GW_PID=$!
    PIDS+=("$GW_PID")
    local i line=""
    for i in $(seq 200); do
        line=$(grep -m1 '^fairgate listening ' "$log" 2>/dev/null || true)
        [ -n "$line" ] && break
        sleep 0.05
    done
    [ -n "$line" ] || { echo "fairgate did not start:" >&2; cat "$log" >&2; exit 1; }
    GW_PORT=$(sed -E 's/.*data=127\.0\.0\.1:([0-9]+).*/\1/' <<<"$line")
}

# CPU time (user + system, all threads) a process has used, in clock ticks.
cpu_ticks() { sed 's/^.*) //' "/proc/$1/stat" | awk '{ print $12 + $13 }'; }
TICK_US=$(( 1000000 / $(getconf CLK_TCK) ))

# run_wrk PIN SECONDS PORT → "rps p50_us p99_us requests"
run_wrk() {
    $1 wrk -t1 -c"$CONNECTIONS" -d"$2s" --timeout 5s --latency "http://127.0.0.1:$3/" \
        | awk '
            function us(v) {
                if (v ~ /us$/) return v + 0; if (v ~ /ms$/) return v * 1000; if (v ~ /s$/) return v * 1000000; return v
            }
            /Requests\/sec:/ { rps = $2 }
            / requests in / { n = $1 }
            $1 == "50%" { p50 = us($2) }
            $1 == "99%" { p99 = us($2) }
            /Non-2xx/ { bad = $NF }
            END { if (bad > 0) { print "non-2xx answers: " bad > "/dev/stderr"; exit 1 } printf "%.0f %.0f %.0f %d\n", rps, p50, p99, n }'
}

median() { sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

RESULTS="$WORK/results.txt"
: >"$RESULTS"
for mode in $MODES; do
    case "$mode" in
        pinned) WORKERS=1; GW_PIN="nice -n $NICE taskset -c 0"; LOAD_PIN="nice -n $NICE taskset -c 1" ;;
        unpinned) WORKERS=2; GW_PIN="nice -n $NICE"; LOAD_PIN="nice -n $NICE" ;;
        *) echo "unknown mode $mode" >&2; exit 2 ;;
    esac
    start_nginx "$LOAD_PIN"
    for run in $(seq "$RUNS"); do
        for runtime in multi_thread thread_per_core; do
            busy=$(wait_quiet)
            start_gateway "$runtime" "$WORKERS" "$GW_PIN"
            run_wrk "$LOAD_PIN" 2 "$GW_PORT" >/dev/null
            c0=$(cpu_ticks "$GW_PID")
            read -r rps p50 p99 n < <(run_wrk "$LOAD_PIN" "$DURATION" "$GW_PORT") || true
            c1=$(cpu_ticks "$GW_PID")
            [ -n "${n:-}" ] && [ "$n" -gt 0 ] || { echo "wrk failed against $runtime" >&2; exit 1; }
            cpu_us=$(awk -v t=$(( (c1 - c0) * TICK_US )) -v n="$n" 'BEGIN { printf "%.1f", t / n }')
            stop_pid "$GW_PID"
            echo "$mode $runtime $run $rps $p50 $p99 $cpu_us $busy" | tee -a "$RESULTS" >&2
        done
    done
    stop_pid "$NGINX_PID"
done

echo
echo "| mode | workers | runtime | req/s (median of $RUNS) | p50 µs | p99 µs | gateway CPU µs/req |"
echo "|---|---|---|---|---|---|---|"
for mode in $MODES; do
    w=1; [ "$mode" = unpinned ] && w=2
    for runtime in multi_thread thread_per_core; do
        rps=$(awk -v m="$mode" -v r="$runtime" '$1 == m && $2 == r { print $4 }' "$RESULTS" | median)
        p50=$(awk -v m="$mode" -v r="$runtime" '$1 == m && $2 == r { print $5 }' "$RESULTS" | median)
        p99=$(awk -v m="$mode" -v r="$runtime" '$1 == m && $2 == r { print $6 }' "$RESULTS" | median)
        cpu=$(awk -v m="$mode" -v r="$runtime" '$1 == m && $2 == r { print $7 }' "$RESULTS" | median)
        echo "| $mode | $w | $runtime | $rps | $p50 | $p99 | $cpu |"
    done
done
