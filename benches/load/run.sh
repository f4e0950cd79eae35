#!/usr/bin/env bash
# fairgate gateway load harness. Documented in BENCHMARKS.md ("Gateway load harness").
#
# Measures, in one run and interleaved, every contender behind the same upstream, on 127.0.0.1
# only: requests/s, p50/p99 latency (wrk) and the proxy's CPU time per request (utime+stime
# deltas of its processes from /proc/<pid>/stat). Writes a markdown table to stdout and raw
# results to target/load/<timestamp>/ (target/load/latest points at the newest run).
#
# Pinned mode (default): every proxy gets one worker/thread on core 0 (taskset -c 0); the
# upstream and the load generator share core 1. Unpinned mode: proxies get two workers, nothing
# is pinned.
#
# The contenders fairgate-redis-async and fairgate-redis-exact (group "backends") keep their
# state in a redis-server the script starts on 127.0.0.1 (a free port, no persistence), on the
# load generator's core in pinned mode; its CPU time per request is reported beside the proxy's.
#
# Every process this script starts is stopped by its PID on exit; every point is bounded
# (--duration, at most 20 s).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"

ALL_CONTENDERS="direct hyper hyper-conn pingora nginx nginx-limit haproxy fairgate-empty fairgate-full fairgate-reject30 fairgate-full-mt fairgate-full-access"
AXUM_CONTENDERS="axum axum-fairgate axum-fairgate-reject30 axum-governor"
REDIS_CONTENDERS="fairgate-redis-async fairgate-redis-exact"

usage() {
    cat <<EOF
usage: benches/load/run.sh [options]

  --quick                1 run x 5 s per point, pinned mode only (for development)
  --runs N               rounds over all contenders; medians are reported (default 3)
  --duration S           seconds of load per point, 1..20 (default 10)
  --warmup S             seconds of load per contender before the first round (default 5)
  --connections C        wrk connections (default 64)
  --keys K               distinct x-api-key values the wrk script rotates over (default 100000)
  --contenders LIST      comma-separated subset of:
                           $ALL_CONTENDERS
                           $AXUM_CONTENDERS
                           $REDIS_CONTENDERS
                         or the group names "proxies" (default), "axum", "backends"
                         (fairgate-full and the two Redis backends) and "all"
  --modes LIST           pinned,unpinned (default both; --quick: pinned)
  --nice N               niceness of the measured processes, wrk and the upstream (default -10
                         as root, so that other tenants' builds interfere less; 0 otherwise)
  --quiet-wait S         before each point, wait up to S seconds for other tenants' load on the
                         machine to drop below 15% (default 60; 0 = don't wait); the load seen
                         is recorded with every point either way
  --profile LIST         after the rounds, load these contenders once more under
                         'perf record -e cpu-clock' and write flat and call-graph profiles to
                         the run directory (perf-<mode>-<name>.txt); not part of the table
  --max-other F          a point during which other tenants used more than this share of the
                         machine (0..1, default 0.10) is measured again, up to --attempts times
                         in all; the least disturbed attempt is kept
  --attempts N           (default 3)
  --no-install           fail instead of installing missing tools
  --no-build             use the binaries already built
  -h, --help             this text
EOF
}

RUNS=3
DURATION=10
WARMUP=5
CONNECTIONS=64
KEYS=100000
CONTENDERS="proxies"
MODES=""
INSTALL=1
BUILD=1
QUICK=0
QUIET_WAIT=60
PROFILE=""
MAX_OTHER=0.10
ATTEMPTS=3
if [ "$(id -u)" = 0 ]; then NICE=-10; else NICE=0; fi

while [ $# -gt 0 ]; do
    case "$1" in
        --quick) QUICK=1; RUNS=1; DURATION=5; WARMUP=3 ;;
        --runs) RUNS="$2"; shift ;;
        --duration) DURATION="$2"; shift ;;
        --warmup) WARMUP="$2"; shift ;;
        --connections) CONNECTIONS="$2"; shift ;;
        --keys) KEYS="$2"; shift ;;
        --contenders) CONTENDERS="$2"; shift ;;
        --modes) MODES="$2"; shift ;;
        --nice) NICE="$2"; shift ;;
        --quiet-wait) QUIET_WAIT="$2"; shift ;;
        --profile) PROFILE="${2//,/ }"; shift ;;
        --max-other) MAX_OTHER="$2"; shift ;;
        --attempts) ATTEMPTS="$2"; shift ;;
        --no-install) INSTALL=0 ;;
        --no-build) BUILD=0 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "unknown option: $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done
if [ -z "$MODES" ]; then
    if [ "$QUICK" = 1 ]; then MODES="pinned"; else MODES="pinned,unpinned"; fi
fi
case "$DURATION" in ''|*[!0-9]*) echo "--duration must be a whole number of seconds" >&2; exit 2 ;; esac
if [ "$DURATION" -lt 1 ] || [ "$DURATION" -gt 20 ]; then
    echo "--duration must be 1..20 seconds (each point is bounded)" >&2; exit 2
fi
if [ "$WARMUP" -gt 20 ]; then echo "--warmup must be at most 20 seconds" >&2; exit 2; fi

# Expand groups, keep order, drop duplicates.
expanded=""
for c in ${CONTENDERS//,/ }; do
    case "$c" in
        proxies) expanded="$expanded $ALL_CONTENDERS" ;;
        axum) expanded="$expanded $AXUM_CONTENDERS" ;;
        backends) expanded="$expanded fairgate-full $REDIS_CONTENDERS" ;;
        all) expanded="$expanded $ALL_CONTENDERS $AXUM_CONTENDERS $REDIS_CONTENDERS" ;;
        *)
            case " $ALL_CONTENDERS $AXUM_CONTENDERS $REDIS_CONTENDERS " in
                *" $c "*) expanded="$expanded $c" ;;
                *) echo "unknown contender: $c" >&2; exit 2 ;;
            esac ;;
    esac
done
LIST=""
for c in $expanded; do case " $LIST " in *" $c "*) ;; *) LIST="$LIST $c" ;; esac; done
LIST="${LIST# }"

wants() { # wants PATTERN: is any selected contender matching PATTERN?
    local c
    for c in $LIST; do
        # shellcheck disable=SC2254
        case "$c" in $1) return 0 ;; esac
    done
    return 1
}

log() { echo "[load] $*" >&2; }

# ---------------------------------------------------------------------------------------------
# Tools

install_missing() {
    local need=()
    command -v nginx >/dev/null || need+=(nginx)
    command -v wrk >/dev/null || need+=(wrk)
    command -v curl >/dev/null || need+=(curl)
    command -v taskset >/dev/null || need+=(util-linux)
    command -v python3 >/dev/null || need+=(python3)
    if [ -n "$PROFILE" ]; then command -v perf >/dev/null || need+=(linux-perf); fi
    if wants pingora; then command -v cmake >/dev/null || need+=(cmake); fi
    if wants haproxy; then command -v haproxy >/dev/null || need+=(haproxy); fi
    if wants 'fairgate-redis*'; then
        # redis-cli comes with redis-server (its dependency redis-tools).
        if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
            need+=(redis-server)
        fi
    fi
    [ ${#need[@]} -eq 0 ] && return 0
    if [ "$INSTALL" = 0 ]; then
        echo "missing tools (${need[*]}); run without --no-install to apt-get them" >&2
        exit 1
    fi
    log "installing ${need[*]} from Debian"
    local sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    # Keep the packages' services (nginx, haproxy, redis-server) from starting on install.
    local made_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' | $sudo tee /usr/sbin/policy-rc.d >/dev/null
        $sudo chmod +x /usr/sbin/policy-rc.d
        made_policy=1
    fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >&2
    if [ "$made_policy" = 1 ]; then $sudo rm -f /usr/sbin/policy-rc.d; fi
}

HYPER_BIN="${HYPER_BIN:-$ROOT/target/release/hyper_proxy}"
PINGORA_DIR="$HERE/pingora-proxy"
PINGORA_BIN="$PINGORA_DIR/target/release/pingora-bare-proxy"
FAIRGATE_BIN="${FAIRGATE_BIN:-$ROOT/target/release/fairgate}"
AXUM_BIN="$ROOT/target/release/axum_app"

build() {
    [ "$BUILD" = 1 ] || return 0
    # nice: the machine is shared; these are heavy release builds.
    if wants 'hyper*'; then
        log "building hyper_proxy (release)"
        (cd "$ROOT" && nice -n 19 cargo build --release -q -p fairgate-benches --bin hyper_proxy)
    fi
    if wants 'axum*'; then
        log "building axum_app (release)"
        (cd "$ROOT" && nice -n 19 cargo build --release -q -p fairgate-benches --bin axum_app)
    fi
    if wants 'fairgate*'; then
        log "building fairgate (release)"
        (cd "$ROOT" && nice -n 19 cargo build --release -q -p fairgate-gateway --bin fairgate)
    fi
    if wants pingora; then
        log "building the bare pingora proxy (release, own workspace and lock file)"
        (cd "$PINGORA_DIR" && nice -n 19 cargo build --release -q --locked)
    fi
}

# ---------------------------------------------------------------------------------------------
# Processes

STARTED_PIDS=()

stop_pid() { # stop_pid PID: TERM, wait up to 5 s, then KILL
    local pid="$1" i
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

cleanup() { # newest first: the proxies before the upstream and redis-server they use
    local i
    for ((i = ${#STARTED_PIDS[@]} - 1; i >= 0; i--)); do stop_pid "${STARTED_PIDS[$i]}"; done
    STARTED_PIDS=()
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

wait_ready() { # wait_ready NAME PORT PID: poll until HTTP answers, 60 s deadline
    local name="$1" port="$2" pid="$3" deadline=$((SECONDS + 60))
    while [ $SECONDS -lt $deadline ]; do
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "$name exited during start-up; its log:" >&2
            cat "$RUN/$name.log" >&2 || true
            exit 1
        fi
        if curl -s -o /dev/null -m 1 -H 'x-api-key: ready-probe' "http://127.0.0.1:$port/"; then
            return 0
        fi
        sleep 0.1
    done
    echo "$name did not answer on 127.0.0.1:$port within 60 s" >&2
    exit 1
}

# pids_of PID: the process and its children (nginx's workers).
pids_of() {
    echo "$1"
    pgrep -P "$1" || true
}

REDIS_PID=""
REDIS_PORT=""

# start_redis PIN: a redis-server on 127.0.0.1 and a free port, no persistence; waits for PING
# (60 s deadline).
start_redis() {
    local pin="$1" deadline=$((SECONDS + 60))
    REDIS_PORT=$(free_port)
    # shellcheck disable=SC2086
    $pin redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save '' --appendonly no \
        --protected-mode no --daemonize no --loglevel warning >"$RUN/redis.log" 2>&1 &
    REDIS_PID=$!
    STARTED_PIDS+=("$REDIS_PID")
    while [ $SECONDS -lt $deadline ]; do
        if ! kill -0 "$REDIS_PID" 2>/dev/null; then
            echo "redis-server exited during start-up; its log:" >&2
            cat "$RUN/redis.log" >&2 || true
            exit 1
        fi
        if [ "$(redis-cli -h 127.0.0.1 -p "$REDIS_PORT" PING 2>/dev/null)" = PONG ]; then
            return 0
        fi
        sleep 0.1
    done
    echo "redis-server did not answer PING on 127.0.0.1:$REDIS_PORT within 60 s" >&2
    exit 1
}

# redis_drain: after a point of a Redis contender, wait (up to 20 s) until redis-server is idle
# (under 2 ticks in 0.5 s) and print the CPU ticks it used meanwhile: its deferred work for the
# point, mostly expiring the keys the point wrote (they live about 1 s past their bucket's TAT,
# the leases' sets 6 s), which otherwise would land in the next contender's point.
redis_drain() {
    local start prev now deadline=$((SECONDS + 20))
    start=$(cpu_ticks "$REDIS_PID")
    prev=$start
    now=$start
    while [ $SECONDS -lt $deadline ]; do
        sleep 0.5
        now=$(cpu_ticks "$REDIS_PID")
        [ $((now - prev)) -lt 2 ] && break
        prev=$now
    done
    echo $((now - start))
}

redis_commands() { # redis_commands: commands redis-server has processed so far (0: none running)
    local n=""
    if [ -n "$REDIS_PID" ]; then
        n=$(redis-cli -h 127.0.0.1 -p "$REDIS_PORT" INFO stats 2>/dev/null \
            | sed -n 's/^total_commands_processed:\([0-9]*\).*/\1/p')
    fi
    echo "${n:-0}"
}

redis_failures() { # redis_failures NAME: `redis call failed` warnings (at most 1/s) logged so far
    local n
    n=$(grep -c 'redis call failed' "$RUN/$1.log" 2>/dev/null || true)
    echo "${n:-0}"
}

cpu_ticks() { # cpu_ticks PID...: utime+stime summed over the processes (all their threads)
    local total=0 pid t
    for pid in "$@"; do
        [ -r "/proc/$pid/stat" ] || continue
        # Fields after "pid (comm) ": state is $1, utime $12, stime $13.
        t=$(sed 's/^.*) //' "/proc/$pid/stat" | awk '{print $12 + $13}')
        total=$((total + t))
    done
    echo "$total"
}

core_busy() { # core_busy: "busy0 total0 busy1 total1" jiffies from /proc/stat
    awk '/^cpu0 /{b0=$2+$3+$4+$7+$8; t0=b0+$5+$6} /^cpu1 /{b1=$2+$3+$4+$7+$8; t1=b1+$5+$6} END{print b0, t0, b1, t1}' /proc/stat
}

# background_busy: share of both cores busy over 0.5 s while none of our load runs (the
# contenders are idle then), i.e. what other tenants of the machine are using.
background_busy() {
    local a b
    a=$(awk '/^cpu /{print $2+$3+$4+$7+$8, $2+$3+$4+$5+$6+$7+$8}' /proc/stat)
    sleep 0.5
    b=$(awk '/^cpu /{print $2+$3+$4+$7+$8, $2+$3+$4+$5+$6+$7+$8}' /proc/stat)
    echo "$a $b" | awk '{d=$4-$2; printf "%.3f\n", (d > 0 ? ($3-$1)/d : 0)}'
}

# wait_quiet: poll the background load until it is under 15% or --quiet-wait runs out; prints
# the last reading.
wait_quiet() {
    local deadline=$((SECONDS + QUIET_WAIT)) bg
    bg=$(background_busy)
    while [ $SECONDS -lt $deadline ] && awk -v b="$bg" 'BEGIN{exit !(b >= 0.15)}'; do
        bg=$(background_busy)
    done
    echo "$bg"
}

# ---------------------------------------------------------------------------------------------
# Configurations

nginx_common() { # nginx_common NAME WORKERS
    cat <<EOF
worker_processes $2;
daemon off;
master_process on;
pid $RUN/$1.pid;
error_log $RUN/$1.err warn;
worker_rlimit_nofile 65536;
events { worker_connections 8192; }
EOF
}

nginx_http_common() { # temp paths inside the run dir, no access log, long keep-alive
    cat <<EOF
    access_log off;
    client_body_temp_path $RUN/nginx-tmp/body;
    proxy_temp_path $RUN/nginx-tmp/proxy;
    fastcgi_temp_path $RUN/nginx-tmp/fastcgi;
    uwsgi_temp_path $RUN/nginx-tmp/uwsgi;
    scgi_temp_path $RUN/nginx-tmp/scgi;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
EOF
}

write_upstream_conf() { # the origin: nginx answering 200 with a 3-byte body
    {
        nginx_common upstream "$1"
        echo "http {"
        nginx_http_common
        cat <<EOF
    server {
        listen 127.0.0.1:$UPSTREAM_PORT backlog=4096;
        location / { default_type text/plain; return 200 "ok\n"; }
    }
}
EOF
    } >"$RUN/upstream.conf"
}

write_nginx_proxy_conf() { # write_nginx_proxy_conf NAME PORT WORKERS LIMIT(0|1)
    local name="$1" port="$2" workers="$3" limit="$4"
    {
        nginx_common "$name" "$workers"
        echo "http {"
        nginx_http_common
        if [ "$limit" = 1 ]; then
            # Per API key, like fairgate's full policy; 100,000 keys fit in 64 MB with room.
            # The rate and burst are far above what any one key is sent: limits never hit.
            # shellcheck disable=SC2016 # nginx variables, not the shell's
            echo '    limit_req_zone $http_x_api_key zone=per_key:64m rate=1000r/s;'
            echo '    limit_req_status 429;'
        fi
        cat <<EOF
    upstream origin {
        server 127.0.0.1:$UPSTREAM_PORT;
        keepalive 512;
        keepalive_requests 100000000;
    }
    server {
        listen 127.0.0.1:$port backlog=4096;
        location / {
EOF
        if [ "$limit" = 1 ]; then
            echo '            limit_req zone=per_key burst=2000 nodelay;'
        fi
        cat <<EOF
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
EOF
    } >"$RUN/$name.conf"
}

# The policies are files beside this script (shared with benches/benches/layer.rs); copied into
# the run directory so that a run's record holds what it measured.
write_policies() {
    cp "$HERE/policy-empty.yaml" "$HERE/policy-full.yaml" "$RUN/"
}

# write_redis_policy MODE(async|exact): policy-full.yaml with its `state` section (the last
# top-level key) replaced by the same max_keys on the Redis backend. `on_failure: closed`: a
# Redis call that fails or times out answers 503, so a struggling Redis shows in the non-2xx
# column instead of being hidden by local decisions. Each mode has its own key prefix, so the
# two gateways do not see each other as one fleet.
write_redis_policy() {
    local mode="$1" out="$RUN/policy-redis-$1.yaml"
    grep -q '^state:' "$HERE/policy-full.yaml" \
        || { echo "policy-full.yaml has no top-level state section" >&2; exit 1; }
    sed '/^state:/,$d' "$HERE/policy-full.yaml" >"$out"
    cat >>"$out" <<EOF
state:
  max_keys: 250000
  backend: redis
  redis:
    url: redis://127.0.0.1:$REDIS_PORT
    mode: $mode
    on_failure: closed
    key_prefix: fairgate-bench-$mode
EOF
}

# write_haproxy_conf NAME PORT THREADS: HAProxy as a reverse proxy with nginx-limit's choices:
# `threads` threads (nginx: workers) in one process, no access log (no `log` line: HAProxy logs
# nothing), keep-alive on both sides with nginx's timeouts (client side 300 s, upstream side
# 60 s, nginx's proxy defaults) and no limit on requests per connection, upstream connections
# kept and shared between clients (`http-reuse always`, as nginx's `keepalive` pool). Admission:
# a stick table per API key; a key above 1000 requests in the last second (nginx-limit's rate)
# is denied with 429; 100,000 keys fit in 200k entries, and no key is sent anywhere near 1000
# requests a second: the limit is never hit.
write_haproxy_conf() {
    local name="$1" port="$2" threads="$3"
    cat >"$RUN/$name.cfg" <<EOF
global
    nbthread $threads
    maxconn 8192

defaults
    mode http
    timeout connect 60s
    timeout client 300s
    timeout server 60s
    timeout http-keep-alive 300s
    http-reuse always

frontend edge
    bind 127.0.0.1:$port backlog 4096
    stick-table type string len 64 size 200k expire 60s store http_req_rate(1s)
    http-request track-sc0 req.hdr(x-api-key)
    http-request deny deny_status 429 if { sc_http_req_rate(0) gt 1000 }
    default_backend origin

backend origin
    server origin 127.0.0.1:$UPSTREAM_PORT
EOF
}

# ---------------------------------------------------------------------------------------------
# Contenders

declare -A PORT PID

start_contender() { # start_contender NAME THREADS PIN(cmd prefix)
    local name="$1" threads="$2" pin="$3" port pid
    port=$(free_port)
    case "$name" in
        direct)
            PORT[$name]=$UPSTREAM_PORT; PID[$name]=""; return 0 ;;
        hyper)
            $pin "$HYPER_BIN" "127.0.0.1:$port" "127.0.0.1:$UPSTREAM_PORT" "$threads" \
                >"$RUN/$name.log" 2>&1 &
            pid=$! ;;
        hyper-conn)
            HYPER_PROXY_POOL=conn $pin "$HYPER_BIN" "127.0.0.1:$port" "127.0.0.1:$UPSTREAM_PORT" \
                "$threads" >"$RUN/$name.log" 2>&1 &
            pid=$! ;;
        pingora)
            $pin "$PINGORA_BIN" "127.0.0.1:$port" "127.0.0.1:$UPSTREAM_PORT" "$threads" "$RUN" \
                >"$RUN/$name.log" 2>&1 &
            pid=$! ;;
        nginx|nginx-limit)
            local limit=0
            [ "$name" = nginx-limit ] && limit=1
            write_nginx_proxy_conf "$name" "$port" "$threads" "$limit"
            $pin nginx -e "$RUN/$name.err" -c "$RUN/$name.conf" >"$RUN/$name.log" 2>&1 &
            pid=$! ;;
        haproxy)
            # -db: stays in the foreground, no master process, so $! is HAProxy itself (its
            # threads are in that one process); its alerts and warnings go to the log.
            write_haproxy_conf "$name" "$port" "$threads"
            $pin haproxy -db -f "$RUN/$name.cfg" >"$RUN/$name.log" 2>&1 &
            pid=$! ;;
        fairgate-empty|fairgate-full|fairgate-reject30|fairgate-full-mt|fairgate-full-access)
            local policy=full runtime=default
            [ "$name" = fairgate-empty ] && policy=empty
            [ "$name" = fairgate-full-mt ] && runtime=multi_thread
            write_fairgate_conf "$name" "$port" "$threads" "$policy" "$runtime"
            if [ "$name" = fairgate-full-access ]; then
                # The access log on, in JSON, to a file in the run directory (what it costs).
                echo "  access: {path: $RUN/$name.access.log, format: json}" \
                    >>"$RUN/$name.gateway.yaml"
            fi
            $pin "$FAIRGATE_BIN" run --config "$RUN/$name.gateway.yaml" >"$RUN/$name.log" 2>&1 &
            pid=$! ;;
        fairgate-redis-async|fairgate-redis-exact)
            local backend="${name#fairgate-redis-}"
            write_redis_policy "$backend"
            write_fairgate_conf "$name" "$port" "$threads" "redis-$backend" default
            $pin "$FAIRGATE_BIN" run --config "$RUN/$name.gateway.yaml" >"$RUN/$name.log" 2>&1 &
            pid=$! ;;
        axum)
            $pin "$AXUM_BIN" "127.0.0.1:$port" bare >"$RUN/$name.log" 2>&1 &
            pid=$! ;;
        axum-fairgate|axum-fairgate-reject30)
            $pin "$AXUM_BIN" "127.0.0.1:$port" fairgate "$RUN/policy-full.yaml" \
                >"$RUN/$name.log" 2>&1 &
            pid=$! ;;
        axum-governor)
            $pin "$AXUM_BIN" "127.0.0.1:$port" governor >"$RUN/$name.log" 2>&1 &
            pid=$! ;;
    esac
    STARTED_PIDS+=("$pid")
    PORT[$name]=$port
    PID[$name]=$pid
    wait_ready "$name" "$port" "$pid"
}

# The gateway config: one route to the upstream, the given policy, `threads` workers of the
# given runtime model (`default`: whatever the gateway defaults to, i.e. no `runtime:` key), no
# admin listener, and the decision log off (as nginx's access_log is off here); see
# BENCHMARKS.md.
write_fairgate_conf() { # write_fairgate_conf NAME PORT THREADS POLICY RUNTIME
    local name="$1" port="$2" threads="$3" policy="$4" runtime="$5" runtime_line=""
    [ "$runtime" = default ] || runtime_line="runtime: $runtime"
    cat >"$RUN/$name.gateway.yaml" <<EOF
listen: 127.0.0.1:$port
workers: $threads
$runtime_line
routes:
  - name: all
    path_prefix: /
    upstream: origin
upstreams:
  origin:
    targets: [127.0.0.1:$UPSTREAM_PORT]
policy: $RUN/policy-$policy.yaml
log:
  decisions: "off"
  level: warn
EOF
}

reject_percent() { # the wrk script's share of throttled keys for a contender
    case "$1" in *reject30) echo 30 ;; *) echo 0 ;; esac
}

# run_point NAME MODE RUNNO SECONDS PINWRK WRKTHREADS: one wrk run, one results row
run_point() {
    local name="$1" mode="$2" runno="$3" secs="$4" pinwrk="$5" wthreads="$6"
    local attempt best_line="" best_other=2 line other
    for attempt in $(seq "$ATTEMPTS"); do
        line=$(measure_point "$name" "$mode" "$runno" "$secs" "$pinwrk" "$wthreads" "$attempt")
        other=${line##* other=}
        echo -e "$line" >>"$RUN/attempts.tsv"
        if awk -v o="$other" -v b="$best_other" 'BEGIN{exit !(o < b)}'; then
            best_line="$line"
            best_other="$other"
        fi
        awk -v o="$other" -v m="$MAX_OTHER" 'BEGIN{exit !(o > m)}' || break
        [ "$attempt" -lt "$ATTEMPTS" ] && log "$mode run $runno $name: other tenants used $other of the machine; measuring again"
    done
    echo -e "$best_line" >>"$RUN/results.tsv"
    local shown="requests=${best_line#*requests=}"
    log "$mode run $runno $name: ${shown%% core_jiffies=*}, other=${best_line##* other=}"
}

# measure_point NAME MODE RUNNO SECONDS PINWRK WRKTHREADS ATTEMPT: one wrk run; prints the
# results line (tab-separated mode, run, contender, then key=value fields; see report.py),
# ending in other=<share of the machine other tenants used during the point>.
measure_point() {
    local name="$1" mode="$2" runno="$3" secs="$4" pinwrk="$5" wthreads="$6" attempt="$7"
    local port="${PORT[$name]}" pids=() upids=() out c0 c1 u0 u1 r0 r1 b0 b1
    mapfile -t upids < <(pids_of "$UPSTREAM_PID")
    if [ -n "${PID[$name]}" ]; then
        mapfile -t pids < <(pids_of "${PID[$name]}")
    else
        # direct: the origin's own CPU is the "proxy" CPU, i.e. what serving costs at all.
        pids=("${upids[@]}")
    fi
    out="$RUN/raw/$mode-$runno-$name-$attempt.txt"
    local bg
    bg=$(wait_quiet)
    c0=$(cpu_ticks "${pids[@]}")
    u0=$(cpu_ticks "${upids[@]}")
    r0=$(cpu_ticks ${REDIS_PID:+"$REDIS_PID"})
    local f0 f1 k0 k1
    f0=$(redis_failures "$name")
    k0=$(redis_commands)
    b0=$(core_busy)
    # wrk runs under a small bash that reports, after wrk has exited, its children's CPU
    # ticks (cutime + cstime): with the proxy's and the upstream's, that is all of our own
    # CPU, and the rest of the machine's busy time during the point is other tenants'.
    # shellcheck disable=SC2086,SC2016
    $pinwrk bash -c 'out="$1"; shift; "$@" >"$out" 2>&1; rc=$?
        sed "s/^.*) //" /proc/$$/stat | awk "{print \$14 + \$15}" >"$out.ticks"; exit $rc' \
        _ "$out" wrk -t"$wthreads" -c"$CONNECTIONS" -d"${secs}s" --timeout 5s \
        -s "$HERE/keys.lua" "http://127.0.0.1:$port/" -- "$(reject_percent "$name")" "$KEYS" \
        || { echo "wrk failed against $name:" >&2; cat "$out" >&2; exit 1; }
    c1=$(cpu_ticks "${pids[@]}")
    u1=$(cpu_ticks "${upids[@]}")
    r1=$(cpu_ticks ${REDIS_PID:+"$REDIS_PID"})
    b1=$(core_busy)
    f1=$(redis_failures "$name")
    local tail=0
    case "$name" in fairgate-redis-*) tail=$(redis_drain) ;; esac
    # Commands over the point and its drain, less the first INFO call (counted by the second).
    k1=$(redis_commands)
    local result wt ut ct rt
    result=$(grep '^RESULT ' "$out" | tail -1)
    [ -n "$result" ] || { echo "no RESULT line from wrk for $name" >&2; cat "$out" >&2; exit 1; }
    wt=$(cat "$out.ticks")
    ct=$((c1 - c0))
    ut=$((u1 - u0))
    # redis-server's CPU: the cost of the Redis backends (near 0 for the others, but counted
    # as ours for every point so that it is never taken for other tenants' load).
    rt=$((r1 - r0))
    [ -n "${PID[$name]}" ] || ut=0
    # Other tenants' share: all busy jiffies of both cores less ours, over all jiffies.
    local other
    other=$(echo "$b0 $b1" | awk -v ours=$((ct + ut + wt + rt)) '{
        busy = ($5 - $1) + ($7 - $3); total = ($6 - $2) + ($8 - $4);
        o = total > 0 ? (busy - ours) / total : 0; if (o < 0) o = 0; printf "%.3f", o }')
    local clk
    clk=$(getconf CLK_TCK)
    printf '%s\t%s\t%s\t%s\n' "$mode" "$runno" "$name" "${result#RESULT } cpu_ticks=$ct upstream_ticks=$ut redis_ticks=$rt redis_tail_ticks=$tail redis_failed=$((f1 - f0)) redis_commands=$((k1 > k0 ? k1 - k0 - 1 : 0)) wrk_ticks=$wt clk_tck=$clk bg_busy=$bg attempt=$attempt core_jiffies=${b0// /,},${b1// /,} other=$other"
}

# profile_point NAME MODE SECONDS PINWRK WRKTHREADS: perf profile of a contender under load
profile_point() {
    local name="$1" mode="$2" secs="$3" pinwrk="$4" wthreads="$5"
    local pid="${PID[$name]:-$UPSTREAM_PID}" data="$RUN/perf-$mode-$name.data"
    local txt="$RUN/perf-$mode-$name.txt"
    log "$mode profiling $name (${secs}s)"
    # shellcheck disable=SC2086
    $pinwrk wrk -t"$wthreads" -c"$CONNECTIONS" -d"$((secs + 1))s" -s "$HERE/keys.lua" \
        "http://127.0.0.1:${PORT[$name]}/" -- "$(reject_percent "$name")" "$KEYS" \
        >"$RUN/raw/$mode-profile-$name.txt" 2>&1 &
    local wrk_pid=$!
    STARTED_PIDS+=("$wrk_pid")
    # cpu-clock: this VM exposes no hardware counters. DWARF call graphs need the debug info
    # the release profiles keep (debug = 1).
    perf record -q -e cpu-clock -F 999 --call-graph dwarf,16384 -p "$pid" -o "$data" \
        -- sleep "$secs" >/dev/null 2>&1 || true
    wait "$wrk_pid" 2>/dev/null || true
    {
        echo "# perf profile of $name ($mode), cpu-clock, ${secs}s under the harness's load"
        echo "# (raw data: $data; e.g. perf report -i $data --children)"
        echo "## by object (kernel, binary, libc)"
        perf report -i "$data" --no-children --sort dso --stdio -q -g none 2>/dev/null \
            | sed -E '/^$/d; s/ +$//' | head -12 || true
        echo "## flat (self time)"
        perf report -i "$data" --no-children --sort symbol --stdio -q -g none \
            --percent-limit 0.4 2>/dev/null | sed -E '/^$/d; s/[ -]+$//' | head -80 || true
        echo "## inclusive (self + callees), the proxy's own layers and the client only"
        perf report -i "$data" --children --sort symbol --stdio -q -g none \
            --percent-limit 0.5 2>/dev/null | sed -E '/^$/d; s/[ -]+$//' \
            | grep -E 'fairgate|tower|Admission|Engine|hyper_util::client|proxy|malloc|free' \
            | head -80 || true
    } >"$txt"
    log "profile written to $txt"
}

# ---------------------------------------------------------------------------------------------
# Main

install_missing
build

for c in $LIST; do
    case "$c" in
        hyper|hyper-conn) [ -x "$HYPER_BIN" ] || { echo "missing $HYPER_BIN" >&2; exit 1; } ;;
        pingora) [ -x "$PINGORA_BIN" ] || { echo "missing $PINGORA_BIN" >&2; exit 1; } ;;
        fairgate*) [ -x "$FAIRGATE_BIN" ] || { echo "missing $FAIRGATE_BIN" >&2; exit 1; } ;;
        axum*) [ -x "$AXUM_BIN" ] || { echo "missing $AXUM_BIN" >&2; exit 1; } ;;
    esac
done

STAMP=$(date -u +%Y%m%dT%H%M%SZ)
RUN="$ROOT/target/load/$STAMP"
mkdir -p "$RUN/raw" "$RUN/nginx-tmp"
ln -sfn "$STAMP" "$ROOT/target/load/latest"
write_policies
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "nproc: $(nproc)"
    echo "cpu: $(awk -F': ' '/^model name/{print $2; exit}' /proc/cpuinfo)"
    echo "kernel: $(uname -sr)"
    echo "nginx: $(nginx -v 2>&1 | sed 's/^nginx version: //')"
    echo "wrk: $(wrk -v 2>&1 | head -1 | awk '{print $2}')"
    if wants haproxy; then echo "haproxy: $(haproxy -v | sed -n 's/^HAProxy version \([^ ]*\).*/\1/p')"; fi
    if wants 'fairgate-redis*'; then
        echo "redis: $(redis-server --version | sed -n 's/.* v=\([^ ]*\).*/\1/p')"
    fi
    echo "loadavg: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "git: $(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "command: benches/load/run.sh --runs $RUNS --nice $NICE --quiet-wait $QUIET_WAIT --max-other $MAX_OTHER --attempts $ATTEMPTS --duration $DURATION --warmup $WARMUP --connections $CONNECTIONS --keys $KEYS --contenders ${LIST// /,} --modes $MODES"
    echo "contenders: $LIST"
    echo "modes: $MODES"
} >"$RUN/machine.txt"
log "results in $RUN"

for mode in ${MODES//,/ }; do
    case "$mode" in
        pinned) THREADS=1; PIN="nice -n $NICE taskset -c 0"; PINSIDE="nice -n $NICE taskset -c 1"; WTHREADS=1 ;;
        unpinned) THREADS=2; PIN="nice -n $NICE"; PINSIDE="nice -n $NICE"; WTHREADS=2 ;;
        *) echo "unknown mode: $mode" >&2; exit 2 ;;
    esac
    UPSTREAM_PORT=$(free_port)
    write_upstream_conf 1
    $PINSIDE nginx -e "$RUN/upstream.err" -c "$RUN/upstream.conf" >"$RUN/upstream.log" 2>&1 &
    UPSTREAM_PID=$!
    STARTED_PIDS+=("$UPSTREAM_PID")
    wait_ready upstream "$UPSTREAM_PORT" "$UPSTREAM_PID"
    REDIS_PID=""
    if wants 'fairgate-redis*'; then start_redis "$PINSIDE"; fi

    for c in $LIST; do
        start_contender "$c" "$THREADS" "$PIN"
    done
    # Warm-up: fills connection pools and, for the key-rotating script, touches every key,
    # so that the measured runs see steady state (the throttled keys have spent their burst).
    if [ "$WARMUP" -gt 0 ]; then
        for c in $LIST; do
            log "$mode warm-up $c (${WARMUP}s)"
            $PINSIDE wrk -t"$WTHREADS" -c"$CONNECTIONS" -d"${WARMUP}s" -s "$HERE/keys.lua" \
                "http://127.0.0.1:${PORT[$c]}/" -- "$(reject_percent "$c")" "$KEYS" \
                >"$RUN/raw/$mode-warmup-$c.txt" 2>&1
        done
        # The warm-up's keys expire in redis-server over the next seconds: not in a point.
        if [ -n "$REDIS_PID" ]; then redis_drain >/dev/null; fi
    fi
    # Interleaved rounds: each round measures every contender once, in a rotated order, so
    # slow drifts of the machine (other tenants, thermal) spread over all of them.
    # shellcheck disable=SC2086 # one positional parameter per contender
    set -- $LIST
    n=$#
    for r in $(seq "$RUNS"); do
        order=()
        for i in $(seq 0 $((n - 1))); do
            idx=$(( (i + r - 1) % n + 1 ))
            order+=("${!idx}")
        done
        for c in "${order[@]}"; do
            run_point "$c" "$mode" "$r" "$DURATION" "$PINSIDE" "$WTHREADS"
        done
    done
    for c in $PROFILE; do
        case " $LIST " in
            *" $c "*) profile_point "$c" "$mode" "$DURATION" "$PINSIDE" "$WTHREADS" ;;
            *) log "not profiling $c: not among the contenders" ;;
        esac
    done
    cleanup
    REDIS_PID=""
done
echo "loadavg-end: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$RUN/machine.txt"

python3 "$HERE/report.py" "$RUN" | tee "$RUN/summary.md"
