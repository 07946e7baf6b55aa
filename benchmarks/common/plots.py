"""matplotlib plots of the benchmark suite (Agg backend: files only, no display needed).

A plot takes `groups`: a list of (label, rows) where rows are summary rows of one series
(one mode of one run), so the same functions draw one run (agg vs disagg) or a comparison
of two runs (`perf.py --compare`).
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

Group = tuple[str, list[dict]]
_STYLE = {"agg": "tab:blue", "disagg": "tab:orange"}


def _xy(rows: list[dict], xkey: str, ykey: str) -> tuple[list, list]:
    pts = sorted((r[xkey], r[ykey]) for r in rows if r.get(xkey) is not None and r.get(ykey) is not None)
    return [p[0] for p in pts], [p[1] for p in pts]


def _color(label: str, i: int):
    for mode, c in _STYLE.items():
        if label == mode:
            return c
    return f"C{i}"


def _save(fig, path: Path, title: str) -> Path:
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _concurrency_axis(ax) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrency")
    ax.grid(True, which="both", alpha=0.3)


def latency_vs_concurrency(groups: list[Group], metric: str, path: Path, title: str) -> Path:
    """metric 'ttft' or 'itl': p50 (solid) and p99 (dashed) per group."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, (label, rows) in enumerate(groups):
        c = _color(label, i)
        for stat, ls in (("p50", "-"), ("p99", "--")):
            x, y = _xy(rows, "concurrency", f"{metric}_{stat}_ms")
            if x:
                ax.plot(x, y, ls, marker="o", color=c, label=f"{label} {stat}")
    _concurrency_axis(ax)
    ax.set_ylabel(f"{metric.upper()} (ms)")
    ax.legend(fontsize=8)
    return _save(fig, path, title)


def throughput_vs_concurrency(groups: list[Group], path: Path, title: str) -> Path:
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4.2))
    for i, (label, rows) in enumerate(groups):
        c = _color(label, i)
        x, y = _xy(rows, "concurrency", "output_token_throughput_tps")
        a1.plot(x, y, "-o", color=c, label=f"{label} total")
        x, y = _xy(rows, "concurrency", "tokens_per_s_per_worker")
        a1.plot(x, y, ":s", color=c, label=f"{label} per worker")
        x, y = _xy(rows, "concurrency", "request_throughput_rps")
        a2.plot(x, y, "-o", color=c, label=label)
    for ax in (a1, a2):
        _concurrency_axis(ax)
        ax.legend(fontsize=8)
    a1.set_ylabel("output tokens/s")
    a2.set_ylabel("requests/s")
    return _save(fig, path, title)


def pareto_frontier(xs: list[float], ys: list[float]) -> tuple[list[float], list[float]]:
    """Points not dominated in (higher x, higher y), sorted by x."""
    pts = sorted(zip(xs, ys, strict=True), key=lambda p: (-p[0], -p[1]))
    front, best_y = [], -np.inf
    for x, y in pts:
        if y > best_y:
            front.append((x, y))
            best_y = y
    front.sort()
    return [p[0] for p in front], [p[1] for p in front]


def pareto(groups: list[Group], path: Path, title: str) -> Path:
    """Dynamo's Pareto view: tokens/s/user (x, interactivity) vs tokens/s per worker (y, cost)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for i, (label, rows) in enumerate(groups):
        c = _color(label, i)
        pts = [(r["tokens_per_s_per_user"], r["tokens_per_s_per_worker"], r["concurrency"]) for r in rows
               if r.get("tokens_per_s_per_user") is not None and r.get("tokens_per_s_per_worker") is not None]
        if not pts:
            continue
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], color=c, label=label, zorder=3)
        for x, y, conc in pts:
            ax.annotate(f"c{conc}", (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7, color=c)
        fx, fy = pareto_frontier([p[0] for p in pts], [p[1] for p in pts])
        ax.plot(fx, fy, "-", color=c, alpha=0.7)
    ax.set_xlabel("tokens/s/user (output, mean per request)")
    ax.set_ylabel("output tokens/s per worker (GPU-equivalent)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path, title)


def perf_plots(groups: list[Group], out_dir: Path, subtitle: str) -> list[Path]:
    out_dir = Path(out_dir)
    return [
        latency_vs_concurrency(groups, "ttft", out_dir / "ttft_vs_concurrency.png", f"TTFT vs concurrency\n{subtitle}"),
        latency_vs_concurrency(groups, "itl", out_dir / "itl_vs_concurrency.png", f"ITL vs concurrency\n{subtitle}"),
        throughput_vs_concurrency(groups, out_dir / "throughput_vs_concurrency.png",
                                  f"Throughput vs concurrency\n{subtitle}"),
        pareto(groups, out_dir / "pareto.png", f"tokens/s/user vs tokens/s/worker\n{subtitle}"),
    ]


# ---- profile_endpoint ------------------------------------------------------------------


def prefill_plots(isl: list[int], ttft_ms: list[float], thpt: list[float], fit: list[float], out_dir: Path,
                  subtitle: str) -> list[Path]:
    out_dir = Path(out_dir)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(isl, ttft_ms, "o", label="measured")
    xs = np.linspace(0, max(isl) * 1.05, 100)
    ax.plot(xs, np.polyval(fit, xs), "-", label=f"fit {fit[0]:.3g}·x² + {fit[1]:.3g}·x + {fit[2]:.3g}")
    ax.set_xlabel("input sequence length (tokens)")
    ax.set_ylabel("TTFT (ms)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    p1 = _save(fig, out_dir / "prefill_ttft.png", f"Prefill: TTFT vs ISL (concurrency 1)\n{subtitle}")
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(isl, thpt, "-o")
    ax.set_xlabel("input sequence length (tokens)")
    ax.set_ylabel("prefill tokens/s per worker")
    ax.grid(True, alpha=0.3)
    p2 = _save(fig, out_dir / "prefill_throughput.png", f"Prefill throughput vs ISL\n{subtitle}")
    return [p1, p2]


def decode_plots(points: list[dict], out_dir: Path, subtitle: str) -> list[Path]:
    """points: {context_length, batch_size, kv_usage, itl_ms, thpt_per_worker}; one line per context length."""
    out_dir = Path(out_dir)
    paths = []
    for key, ylabel, name, title in (
            ("itl_ms", "ITL (ms)", "decode_itl.png", "Decode: ITL vs KV usage"),
            ("thpt_per_worker", "decode tokens/s per worker", "decode_throughput.png",
             "Decode: tokens/s per worker vs KV usage")):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for i, ctx in enumerate(sorted({p["context_length"] for p in points})):
            pts = sorted((p["kv_usage"], p[key], p["batch_size"]) for p in points
                         if p["context_length"] == ctx and p.get(key) is not None)
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", color=f"C{i}", label=f"context {ctx}")
            for x, y, b in pts:
                ax.annotate(f"b{b}", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
        ax.set_xlabel("KV cache usage (fraction of the pool)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        paths.append(_save(fig, out_dir / name, f"{title}\n{subtitle}"))
    return paths


def bar_panels(panels: list[tuple[str, list[str], list[float], str]], path: Path, title: str) -> Path:
    """One bar chart per (panel title, bar labels, values, y label), side by side."""
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (sub, labels, values, ylabel) in zip(axes[0], panels):
        bars = ax.bar(labels, values, color=[f"C{i}" for i in range(len(labels))])
        ax.bar_label(bars, fmt="%.3g")
        ax.set_title(sub)
        ax.set_ylabel(ylabel)
    return _save(fig, path, title)
