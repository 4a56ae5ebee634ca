"""PNG plot of a benchmark run: per (divergence, mode), time and peak-memory bars per provider.

Time bars show the median with a 20-80 % quantile whisker and are annotated with the ratio
to the eager row of the same run; memory bars with the same ratio and a dashed line at one
N x V float32 tensor.

    python -m bench.plot bench/results/<run>.csv      # re-plot a CSV written by the benchmark
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on benchmark machines
import matplotlib.pyplot as plt  # noqa: E402

from .report import read_csv  # noqa: E402

COLORS = {
    "kd-torch": "#4c72b0", "kd-triton": "#8172b2", "kd-ext": "#2ca02c", "eager": "#c44e52",
    "compile": "#dd8452", "compile_chunked": "#937860", "copy_floor": "#7f7f7f",
    "copy_prealloc": "#bbbbbb",
}


def _groups(records):
    """{(divergence, mode): [record]} in first-seen order; copy rows join every full group."""
    groups: dict = {}
    copies = [r for r in records if r["divergence"] == "-"]
    for r in records:
        if r["divergence"] != "-":
            groups.setdefault((r["divergence"], r["mode"]), []).append(r)
    for (_div, mode), members in groups.items():
        if mode == "full":
            members.extend(copies)
    if not groups and copies:
        groups[("-", "full")] = copies
    return groups


def _plot(records, title: str, nv_fp32_bytes: float, path: Path) -> Path:
    groups = _groups(records)
    fig, axes = plt.subplots(len(groups), 2, figsize=(13, 0.55 * 8 * len(groups) + 1.2),
                             squeeze=False)
    for (key, members), (ax_t, ax_m) in zip(groups.items(), axes, strict=True):
        div, mode = key
        eager = next((r for r in members if r["provider"] == "eager"), None)
        names = [r["provider"] for r in members]
        y = range(len(members))
        colors = [COLORS.get(n, "#999999") for n in names]

        med = [r["median_s"] or 0.0 for r in members]
        lo = [max(0.0, m - (r["q20_s"] or m)) for m, r in zip(med, members, strict=True)]
        hi = [max(0.0, (r["q80_s"] or m) - m) for m, r in zip(med, members, strict=True)]
        ax_t.barh(list(y), med, xerr=[lo, hi], color=colors, capsize=3)
        for i, r in enumerate(members):
            if eager and eager["median_s"] and r["median_s"]:
                ratio = r["median_s"] / eager["median_s"]
                x = max(r["median_s"], r["q80_s"] or 0.0)  # right of the whisker
                ax_t.text(x, i, f"  {ratio:.2f}x eager", va="center", fontsize=8)
        ax_t.set_yticks(list(y), names)
        ax_t.invert_yaxis()
        ax_t.set_xlabel("median time (s), whisker 20-80 %")
        ax_t.set_title(f"{div} / {mode}: time")
        ax_t.set_xlim(0, max(m + h for m, h in zip(med + [1e-9], hi + [0.0], strict=True)) * 1.4)

        mem = [(r["peak_extra_bytes"] or 0.0) / 1e9 for r in members]
        ax_m.barh(list(y), mem, color=colors)
        for i, r in enumerate(members):
            b = r["peak_extra_bytes"]
            if b is None:
                continue
            label = f"  {b / nv_fp32_bytes:.2f} NV"
            if eager and eager["peak_extra_bytes"]:
                label += f", {b / eager['peak_extra_bytes']:.2f}x eager"
            ax_m.text(b / 1e9, i, label, va="center", fontsize=8)
        ax_m.axvline(nv_fp32_bytes / 1e9, color="k", ls="--", lw=0.8)
        ax_m.set_yticks(list(y), names)
        ax_m.invert_yaxis()
        ax_m.set_xlabel("peak extra memory (GB); dashed: one N x V float32 tensor")
        ax_m.set_title(f"{div} / {mode}: memory")
        ax_m.set_xlim(0, max(mem + [nv_fp32_bytes / 1e9]) * 1.45)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _title(info: dict, n, v, dtype, temperature) -> str:
    dev = info.get("gpu") if info.get("gpu", "none") != "none" else info.get("cpu", "?")
    return (f"kdkernels bench: N={n} V={v} {dtype} T={temperature}  |  {dev} "
            f"({info.get('cpu_count', '?')} CPUs)  |  torch {info.get('torch', '?')}  |  "
            f"{info.get('date', '')}")


def plot_rows(rows, cfg, path: Path, info: dict) -> Path:
    """Plot the Row objects of a run (bench.measure.Row) to `path`."""
    records = [{"provider": r.provider, "divergence": r.divergence, "mode": r.mode,
                "median_s": r.median(), "q20_s": r.quantiles()[0], "q80_s": r.quantiles()[1],
                "peak_extra_bytes": r.peak} for r in rows]
    dtype = str(cfg.dtype).replace("torch.", "")
    return _plot(records, _title(info, cfg.n, cfg.v, dtype, cfg.temperature),
                 cfg.n * cfg.v * 4, Path(path))


def plot_csv(csv_path: Path, png_path: Path | None = None) -> Path:
    """Plot a CSV written by `python -m bench`."""
    info, body = read_csv(csv_path)

    def num(x):
        return float(x) if x not in (None, "") else None

    records = [{"provider": r["provider"], "divergence": r["divergence"], "mode": r["mode"],
                "median_s": num(r["median_s"]), "q20_s": num(r["q20_s"]),
                "q80_s": num(r["q80_s"]), "peak_extra_bytes": num(r["peak_extra_bytes"])}
               for r in body]
    first = body[0] if body else {"n": 0, "v": 0, "dtype": "?", "temperature": "?"}
    n, v = int(first["n"]), int(first["v"])
    title = _title(info, n, v, first["dtype"], first["temperature"])
    return _plot(records, title, n * v * 4, Path(png_path or Path(csv_path).with_suffix(".png")))


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(plot_csv(Path(arg)))
