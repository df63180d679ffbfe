# SPDX-License-Identifier: LGPL-2.1-or-later
"""Plot a bench result (JSON from bench/bench.py): API latency and daemon RSS against VM count."""

from __future__ import annotations

import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def main() -> None:
    if not os.path.exists(sys.argv[1]):
        print(f"plot: no {sys.argv[1]} (--json given to bench/run?), {sys.argv[2]} left as it was")
        return
    with open(sys.argv[1]) as f:
        res = json.load(f)
    out = sys.argv[2]
    if "scale" not in res:
        print(f"plot: {sys.argv[1]} has no scale results, {out} left as it was")
        return
    scale = res["scale"]
    fig, (lat_ax, rss_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    levels = [int(n) for n in scale["latency"]]
    keys = list(next(iter(scale["latency"].values())))
    for key, colour in zip(keys, ("tab:blue", "tab:orange", "tab:green", "tab:red"), strict=False):
        for pct, style in (("p50_ms", "-"), ("p99_ms", "--")):
            ys = [scale["latency"][str(n)][key][pct] for n in levels]
            lat_ax.plot(levels, ys, style, marker="o", color=colour, label=f"{key} {pct[:3]}")
        wedged = scale["wedged"][key]["p99_ms"]
        lat_ax.plot([levels[-1]], [wedged], marker="x", markersize=10, color=colour, linestyle="none")
    lat_ax.axhline(5, color="grey", linewidth=0.8, linestyle=":")
    lat_ax.set_xlabel("VMs supervised (x: p99 with one QEMU SIGSTOPped)")
    lat_ax.set_ylabel("latency (ms)")
    lat_ax.set_title("API latency (p50 solid, p99 dashed)")
    lat_ax.legend(fontsize=7)
    xs = [n for n, _ in scale["rss_kib"]]
    ys = [r / 1024 for _, r in scale["rss_kib"]]
    rss_ax.plot(xs, ys, marker=".", label="daemon RSS")
    rss_ax.axhline(40, color="grey", linewidth=0.8, linestyle=":", label="40 MiB")
    rss_ax.set_xlabel("VMs supervised")
    rss_ax.set_ylabel("RSS (MiB)")
    rss_ax.set_title(f"daemon RSS: {scale['per_vm_kib'] / 1024:.2f} MiB per VM")
    rss_ax.set_ylim(bottom=0)
    rss_ax.legend(fontsize=7)
    fig.suptitle(f"vmspawnd, {res['date']}, {res['machine']['nproc']} CPUs {res['machine']['cpu']}, TCG")
    fig.tight_layout()
    fig.savefig(out, dpi=100)


if __name__ == "__main__":
    main()
