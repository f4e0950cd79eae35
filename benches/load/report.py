#!/usr/bin/env python3
"""Summarise a load-harness run (benches/load/run.sh) as markdown.

Reads RUN_DIR/results.tsv (one row per wrk run) and RUN_DIR/machine.txt, prints per mode a
table of medians over the runs: requests/s, p50/p99 latency, the contender's CPU time per
request, the share of non-2xx answers, and ratios to nginx+limit_req, to HAProxy (its stick
table per API key) and to bare pingora.
When the run has the Redis-backed contenders (group "backends"), the table instead shows
redis-server's CPU per request beside the proxy's and the ratios of each backend to
fairgate-full (local state). Then it checks the targets of the benchmark issues against the
same run's numbers.

Usage: report.py RUN_DIR
"""

import statistics
import sys
from collections import defaultdict
from pathlib import Path

LABELS = {
    "direct": "direct to upstream (no proxy)",
    "hyper": "minimal hyper proxy",
    "hyper-conn": "minimal hyper proxy, own http1 pool",
    "pingora": "bare pingora",
    "nginx": "nginx",
    "nginx-limit": "nginx + limit_req",
    "haproxy": "HAProxy + stick table",
    "fairgate-empty": "fairgate, empty policy",
    "fairgate-full": "fairgate, full policy",
    "fairgate-reject30": "fairgate, full policy, 30% rejected",
    "fairgate-full-mt": "fairgate, full policy, `runtime: multi_thread`",
    "fairgate-full-access": "fairgate, full policy, access log on (JSON, to a file)",
    "axum": "axum, no middleware",
    "axum-fairgate": "axum + AdmissionLayer, full policy",
    "axum-fairgate-reject30": "axum + AdmissionLayer, 30% rejected",
    "axum-governor": "axum + tower_governor (per API key)",
    "fairgate-redis-async": "fairgate, full policy, Redis `async`",
    "fairgate-redis-exact": "fairgate, full policy, Redis `exact`",
}

LOCAL = "fairgate-full"
REDIS = ("fairgate-redis-async", "fairgate-redis-exact")


def parse(path):
    rows = []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        mode, run, name, rest = line.split("\t")
        kv = dict(item.split("=", 1) for item in rest.split())
        requests = int(kv["requests"])
        secs = int(kv["duration_us"]) / 1e6
        ticks = int(kv["cpu_ticks"])
        clk = int(kv["clk_tck"])
        b = [int(x) for x in kv["core_jiffies"].split(",")]
        # b = busy0 total0 busy1 total1 (before), then the same after
        busy0 = (b[4] - b[0]) / max(1, b[5] - b[1])
        busy1 = (b[6] - b[2]) / max(1, b[7] - b[3])
        # Other tenants' share of the machine during the point: all busy time less our own
        # processes' (proxy, upstream, wrk). USER_HZ jiffies and clock ticks are the same unit.
        all_busy = (b[4] - b[0]) + (b[6] - b[2])
        all_total = (b[5] - b[1]) + (b[7] - b[3])
        redis_ticks = int(kv.get("redis_ticks", 0))
        # Work redis-server did for the point after wrk stopped (expiring the point's keys).
        redis_tail = int(kv.get("redis_tail_ticks", 0))
        ours = ticks + int(kv.get("upstream_ticks", 0)) + redis_ticks + int(kv.get("wrk_ticks", 0))
        if "other" in kv:
            other = float(kv["other"])
        elif "wrk_ticks" in kv:
            other = max(0.0, (all_busy - ours) / max(1, all_total))
        else:
            other = float("nan")
        errors = sum(int(kv[k]) for k in ("connect_err", "read_err", "write_err", "timeout_err"))
        rows.append(
            {
                "mode": mode,
                "run": int(run),
                "name": name,
                "rps": requests / secs,
                "p50": int(kv["p50_us"]),
                "p99": int(kv["p99_us"]),
                "cpu_us": ticks / clk * 1e6 / max(1, requests),
                "redis_cpu_us": (redis_ticks + redis_tail) / clk * 1e6 / max(1, requests),
                "redis_failed": int(kv.get("redis_failed", 0)),
                "redis_cmds": int(kv["redis_commands"]) / max(1, requests) if "redis_commands" in kv else float("nan"),
                "non2xx": int(kv["non2xx"]) / max(1, requests),
                "errors": errors,
                "busy0": busy0,
                "busy1": busy1,
                "bg": float(kv.get("bg_busy", "0")),
                "other": other,
            }
        )
    return rows


def med(values):
    return statistics.median(values) if values else float("nan")


def fmt_ratio(a, b):
    if not b or b != b or a != a:
        return "–"
    return f"{a / b:.2f}×"


def summarise(rows):
    by = defaultdict(list)
    for r in rows:
        by[(r["mode"], r["name"])].append(r)
    out = {}
    for key, rs in by.items():
        out[key] = {
            f: med([r[f] for r in rs])
            for f in ("rps", "p50", "p99", "cpu_us", "redis_cpu_us", "redis_cmds", "non2xx", "busy0", "busy1", "bg", "other")
        }
        out[key]["runs"] = len(rs)
        out[key]["errors"] = sum(r["errors"] for r in rs)
        out[key]["redis_failed"] = sum(r["redis_failed"] for r in rs)
    return out


def backends_table(mode, names, s):
    """The state-backend group: proxy and redis-server CPU, ratios to local state."""
    ref = s.get((mode, LOCAL))
    lines = [
        "| contender | req/s | p50 µs | p99 µs | fairgate CPU µs/req | redis-server CPU µs/req"
        " | CPU µs/req, both | Redis commands/req | non-2xx | req/s ÷ local | fairgate CPU ÷ local | both CPU ÷ local"
        " | p99 ÷ local | Redis failure warnings | core0 / core1 busy | other load |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for n in names:
        m = s.get((mode, n))
        if not m:
            continue
        both = m["cpu_us"] + m["redis_cpu_us"]
        lines.append(
            "| {label} | {rps:,.0f} | {p50:,.0f} | {p99:,.0f} | {cpu:.1f} | {rcpu:.1f} | {both:.1f}"
            " | {cmds} | {bad:.1%} | {rr} | {cr} | {br} | {pr} | {failed} | {b0:.0%} / {b1:.0%} | {other:.0%} |".format(
                label=LABELS.get(n, n),
                rps=m["rps"],
                p50=m["p50"],
                p99=m["p99"],
                cpu=m["cpu_us"],
                rcpu=m["redis_cpu_us"],
                both=both,
                cmds="–" if m["redis_cmds"] != m["redis_cmds"] else f"{m['redis_cmds']:.2f}",
                bad=m["non2xx"],
                rr=fmt_ratio(m["rps"], ref and ref["rps"]),
                cr=fmt_ratio(m["cpu_us"], ref and ref["cpu_us"]),
                br=fmt_ratio(both, ref and ref["cpu_us"] + ref["redis_cpu_us"]),
                pr=fmt_ratio(m["p99"], ref and ref["p99"]),
                failed=m["redis_failed"] if n in REDIS else "–",
                b0=m["busy0"],
                b1=m["busy1"],
                other=m["other"],
            )
        )
    return "\n".join(lines)


def table(mode, names, s):
    if any(n in REDIS for n in names):
        return backends_table(mode, names, s)
    ref_l = s.get((mode, "nginx-limit"))
    ref_h = s.get((mode, "haproxy"))
    ref_p = s.get((mode, "pingora"))
    lines = [
        "| contender | req/s | p50 µs | p99 µs | CPU µs/req | non-2xx | req/s ÷ nginx+limit_req"
        " | req/s ÷ haproxy | req/s ÷ pingora | CPU ÷ nginx+limit_req | CPU ÷ haproxy | CPU ÷ pingora"
        " | p99 ÷ nginx+limit_req | p99 ÷ haproxy | core0 / core1 busy | other load |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for n in names:
        m = s.get((mode, n))
        if not m:
            continue
        lines.append(
            "| {label} | {rps:,.0f} | {p50:,.0f} | {p99:,.0f} | {cpu:.1f} | {bad:.1%} | {rl} | {rh} | {rp}"
            " | {cl} | {ch} | {cp} | {pl} | {ph} | {b0:.0%} / {b1:.0%} | {other:.0%} |".format(
                label=LABELS.get(n, n),
                rps=m["rps"],
                p50=m["p50"],
                p99=m["p99"],
                cpu=m["cpu_us"],
                bad=m["non2xx"],
                rl=fmt_ratio(m["rps"], ref_l and ref_l["rps"]),
                rh=fmt_ratio(m["rps"], ref_h and ref_h["rps"]),
                rp=fmt_ratio(m["rps"], ref_p and ref_p["rps"]),
                cl=fmt_ratio(m["cpu_us"], ref_l and ref_l["cpu_us"]),
                ch=fmt_ratio(m["cpu_us"], ref_h and ref_h["cpu_us"]),
                cp=fmt_ratio(m["cpu_us"], ref_p and ref_p["cpu_us"]),
                pl=fmt_ratio(m["p99"], ref_l and ref_l["p99"]),
                ph=fmt_ratio(m["p99"], ref_h and ref_h["p99"]),
                b0=m["busy0"],
                b1=m["busy1"],
                other=m["other"],
            )
        )
    return "\n".join(lines)


def check(label, value, op, target):
    if value != value:
        return f"- {label}: not measured"
    ok = value >= target if op == ">=" else value <= target
    return f"- {label}: {value:.2f} (target {op} {target:.2f}) — {'met' if ok else 'MISSED'}"


def targets(mode, s):
    g = lambda n: s.get((mode, n))  # noqa: E731
    hyper, ping, limit, hap = g("hyper"), g("pingora"), g("nginx-limit"), g("haproxy")
    out = []
    for name, label in (("fairgate-full", "fairgate full"), ("fairgate-full-mt", "fairgate full (multi_thread)")):
        full = g(name)
        if not full:
            continue
        if hyper:
            # Issue #15: full policy >= 1.0x the minimal hyper proxy, empty policy >= 1.05x.
            out.append(check(f"{label} ÷ minimal hyper, req/s", full["rps"] / hyper["rps"], ">=", 1.0))
            out.append(check("  (same in CPU: hyper CPU ÷ fairgate CPU per request)", hyper["cpu_us"] / full["cpu_us"], ">=", 1.0))
            empty = g("fairgate-empty")
            if name == "fairgate-full" and empty:
                out.append(check("fairgate empty ÷ minimal hyper, req/s", empty["rps"] / hyper["rps"], ">=", 1.05))
                out.append(
                    check("  (same in CPU: hyper CPU ÷ fairgate empty CPU per request)", hyper["cpu_us"] / empty["cpu_us"], ">=", 1.05)
                )
        if ping:
            out.append(check(f"{label} ÷ bare pingora, req/s", full["rps"] / ping["rps"], ">=", 1.8))
            out.append(check("  (same in CPU: pingora CPU ÷ fairgate CPU per request)", ping["cpu_us"] / full["cpu_us"], ">=", 1.8))
        if limit:
            out.append(check(f"{label} ÷ nginx+limit_req, req/s", full["rps"] / limit["rps"], ">=", 0.85))
            out.append(check("  (same in CPU: nginx+limit_req CPU ÷ fairgate CPU per request)", limit["cpu_us"] / full["cpu_us"], ">=", 0.85))
            out.append(check(f"{label} p99 ÷ nginx+limit_req p99", full["p99"] / limit["p99"], "<=", 1.2))
        if hap:
            out.append(check(f"{label} ÷ HAProxy, req/s", full["rps"] / hap["rps"], ">=", 0.85))
            out.append(check("  (same in CPU: HAProxy CPU ÷ fairgate CPU per request)", hap["cpu_us"] / full["cpu_us"], ">=", 0.85))
            out.append(check(f"{label} p99 ÷ HAProxy p99", full["p99"] / hap["p99"], "<=", 1.2))
    local, asyn, exact = g(LOCAL), g("fairgate-redis-async"), g("fairgate-redis-exact")
    if local and asyn:
        out.append(check("Redis `async` ÷ local, req/s (issue #6: within 10%)", asyn["rps"] / local["rps"], ">=", 0.90))
        out.append(
            check("  (same in CPU: local CPU ÷ `async` fairgate CPU per request)", local["cpu_us"] / asyn["cpu_us"], ">=", 0.90)
        )
        both = asyn["cpu_us"] + asyn["redis_cpu_us"]
        out.append(
            check("  (same in CPU with redis-server's: local ÷ `async` fairgate + redis-server)", local["cpu_us"] / both, ">=", 0.90)
        )
    if local and exact:
        out.append(
            f"- Redis `exact` ÷ local: req/s {exact['rps'] / local['rps']:.2f}×, p99 {exact['p99'] / local['p99']:.2f}×;"
            f" CPU per request: fairgate {exact['cpu_us']:.1f} µs + redis-server {exact['redis_cpu_us']:.1f} µs"
            f" vs {local['cpu_us']:.1f} µs local (no target: one Redis round trip per decision by design)"
        )
    for n in (LOCAL,) + REDIS:
        m = g(n)
        if m and n in REDIS and m["non2xx"] > 0:
            out.append(f"- {LABELS[n]}: {m['non2xx']:.2%} non-2xx (`on_failure: closed`: Redis calls that failed or timed out)")
    full, rej = g("fairgate-full"), g("fairgate-reject30")
    if full and rej and rej["non2xx"] > 0:
        f = rej["non2xx"]
        reject_cpu = (rej["cpu_us"] - (1 - f) * full["cpu_us"]) / f
        out.append(
            f"- rejected share {f:.1%}; CPU per request {rej['cpu_us']:.1f} µs vs {full['cpu_us']:.1f} µs all admitted;"
            f" implied CPU per rejection ≈ {reject_cpu:.1f} µs vs {full['cpu_us']:.1f} µs per admit"
        )
        # Issue #15: a rejection costs less than half an admit.
        out.append(check("  rejection CPU ÷ admit CPU", reject_cpu / full["cpu_us"], "<=", 0.5))
    ax, axf, axr, axg = g("axum"), g("axum-fairgate"), g("axum-fairgate-reject30"), g("axum-governor")
    if ax and axf:
        out.append(
            f"- axum + AdmissionLayer adds {axf['cpu_us'] - ax['cpu_us']:+.2f} µs CPU per request over bare axum"
            f" (target ≤ +0.8 µs; served over loopback, so the noise is ±a few tenths: see the criterion bench)"
        )
    if ax and axg:
        out.append(f"- axum + tower_governor adds {axg['cpu_us'] - ax['cpu_us']:+.2f} µs CPU per request over bare axum")
    if axf and axr and axr["non2xx"] > 0:
        f = axr["non2xx"]
        reject_cpu = (axr["cpu_us"] - (1 - f) * axf["cpu_us"]) / f
        out.append(
            f"- axum + AdmissionLayer, {f:.1%} rejected: implied CPU per rejection ≈ {reject_cpu:.1f} µs vs"
            f" {axf['cpu_us']:.1f} µs per admit — {'no more' if reject_cpu <= axf['cpu_us'] else 'MORE'}"
        )
    return out


def main():
    run = Path(sys.argv[1])
    rows = parse(run / "results.tsv")
    s = summarise(rows)
    machine = (run / "machine.txt").read_text().splitlines()
    meta = dict(line.split(": ", 1) for line in machine if ": " in line)
    names = meta.get("contenders", "").split()
    print(f"Run `{run.name}`: {meta.get('command', '')}")
    print()
    print(
        f"Machine: {meta.get('nproc')} cores, {meta.get('cpu')}, {meta.get('kernel')}; "
        f"nginx {meta.get('nginx')}, wrk {meta.get('wrk')}, git {meta.get('git')}"
        + (f", HAProxy {meta['haproxy']}" if "haproxy" in meta else "")
        + (f", redis-server {meta['redis']}" if "redis" in meta else "")
        + "."
    )
    if "loadavg" in meta:
        end = f", at its end {meta['loadavg-end']}" if "loadavg-end" in meta else ""
        print()
        print(f"Load average (1, 5, 15 min) at the start of the run: {meta['loadavg']}{end}.")
    for mode in meta.get("modes", "pinned").split(","):
        if not any(m == mode for m, _ in s):
            continue
        runs = max(v["runs"] for (m, _), v in s.items() if m == mode)
        print()
        side = "upstream, wrk and redis-server" if any(n in REDIS for n in names) else "upstream and wrk"
        if mode == "pinned":
            print(f"### Pinned: 1 worker on core 0; {side} on core 1 (medians of {runs} runs)")
        else:
            print(f"### Unpinned: 2 workers, nothing pinned (medians of {runs} runs)")
        print()
        print(table(mode, names, s))
        print()
        print(
            "CPU µs/req: the contender's own processes (utime + stime, all threads) per completed"
            " request; for `direct`, the upstream's. Core busy: everything on each core during the"
            " point. Other load: the share of both cores used by anything but the contender, the"
            " upstream and wrk during the point (other tenants of the machine); high values make"
            " a row less trustworthy."
        )
        if any(n in REDIS for n in names):
            print()
            print(
                "redis-server CPU µs/req: the redis-server's utime + stime per completed request, over"
                " the point and, for the Redis contenders, until it is idle again afterwards (expiring"
                " the point's keys); counted as ours, not as other load. *Both* adds it to the proxy's."
                " Redis commands/req: redis-server's `total_commands_processed` over the same span per"
                " request (scripts, lease releases, heartbeats of both Redis gateways)."
                " Redis failure warnings: the gateways' `redis call failed` lines during the points,"
                " summed over the runs (logged at most once a second, so a lower bound on seconds with"
                " failures, not a count of calls; with `on_failure: closed` a failed `exact` call is a 503, a failed `async`"
                " exchange loses that interval's usage report, and once 10 calls in a row failed the breaker"
                " opens and requests are 503 until a probe succeeds). The ratios are to `fairgate-full`, the"
                " same policy on local state, in the same run."
            )
        errs = {n: v["errors"] for (m, n), v in s.items() if m == mode and v["errors"]}
        if errs:
            print()
            print("Socket errors (connect/read/write/timeout) summed over runs: " + ", ".join(f"{k} {v}" for k, v in errs.items()))
        t = targets(mode, s)
        if t:
            print()
            print("Targets (same run):")
            print()
            print("\n".join(t))


if __name__ == "__main__":
    main()
