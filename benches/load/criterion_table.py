#!/usr/bin/env python3
"""Print criterion results as markdown tables for BENCHMARKS.md.

Reads target/criterion/<group>/**/new/estimates.json (written by `cargo bench`) and prints, per
group, each benchmark's median time per iteration with criterion's 95% confidence interval.
For the `axum_layer` group (benches/benches/layer.rs) it adds the time over the `bare` variant,
i.e. what the layer adds to a request.

Usage: criterion_table.py [--root target/criterion] GROUP...
"""

import json
import sys
from pathlib import Path


def fmt_ns(ns):
    if ns >= 1e6:
        return f"{ns / 1e6:.2f} ms"
    if ns >= 1e3:
        return f"{ns / 1e3:.2f} µs"
    return f"{ns:.1f} ns"


def load(group_dir):
    out = {}
    for est in sorted(group_dir.glob("**/new/estimates.json")):
        name = str(est.parent.parent.relative_to(group_dir))
        data = json.loads(est.read_text())
        m = data["median"]
        out[name] = (
            m["point_estimate"],
            m["confidence_interval"]["lower_bound"],
            m["confidence_interval"]["upper_bound"],
        )
    return out


def main():
    args = sys.argv[1:]
    root = Path("target/criterion")
    if len(args) >= 2 and args[0] == "--root":
        root = Path(args[1])
        args = args[2:]
    for group in args:
        results = load(root / group)
        if not results:
            print(f"(no results for `{group}` under {root})")
            continue
        print(f"#### `{group}`")
        print()
        base = next((v for k, v in results.items() if k.endswith("bare")), None)
        if base:
            print("| benchmark | median | 95% CI | over `bare` |")
            print("|---|--:|--:|--:|")
        else:
            print("| benchmark | median | 95% CI |")
            print("|---|--:|--:|")
        for name, (med, lo, hi) in results.items():
            row = f"| `{name}` | {fmt_ns(med)} | {fmt_ns(lo)} – {fmt_ns(hi)} |"
            if base and name.endswith("bare"):
                row += " — |"
            elif base:
                sign = "+" if med >= base[0] else "−"
                row += f" {sign}{fmt_ns(abs(med - base[0]))} |"
            print(row)
        print()


if __name__ == "__main__":
    main()
