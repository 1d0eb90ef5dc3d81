"""The figures: medians and ratios per configuration, as text, JSON and a plot."""

from __future__ import annotations

import collections
import statistics
from pathlib import Path
from typing import Any

from lorafit.bench.settings import LORAFIT_CONFIG, BenchSettings


def summarise(runs: list[dict], settings: BenchSettings, ceiling: dict | None = None) -> dict[str, Any]:
    """Medians per configuration, the share of the ceiling each reaches, and ratios of every
    lorafit configuration against TRL's fastest and leanest configurations."""
    by_config: dict[str, list[dict]] = collections.defaultdict(list)
    for run in runs:
        by_config[f"{run['side']}:{run['config']}"].append(run)
    table = {}
    for key, group in by_config.items():
        steps = min(len(r["losses"]) for r in group)
        table[key] = {
            "side": group[0]["side"],
            "config": group[0]["config"],
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in group),
            "tokens_per_s_runs": [round(r["tokens_per_s"], 1) for r in group],
            "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in group),
            "peak_rss_mb_runs": [round(r["peak_rss_mb"]) for r in group],
            "real_tokens_per_step": statistics.mean(t for r in group for t in r["step_tokens"]),
            # after warm-up: CPU seconds (all threads) and minor page faults of one step
            "cpu_s_per_step": statistics.median(
                x for r in group for x in r.get("step_cpu_seconds", [])[settings.warmup :]
            ),
            "faults_per_step": statistics.median(
                x for r in group for x in r.get("step_minor_faults", [])[settings.warmup :]
            ),
            "loss": [statistics.median(r["losses"][s] for r in group) for s in range(steps)],
        }
        if ceiling:
            table[key]["ceiling_share"] = table[key]["tokens_per_s"] / ceiling["tokens_per_s"]
    reference = settings.lorafit_configs[0]  # the configuration the headline ratios are for
    ours = table[f"lorafit:{reference}"]
    trl = [row for row in table.values() if row["side"] == "trl"]
    if not trl:  # lorafit alone (--trl ''): nothing to divide by
        return {"configs": table, "reference": reference, "lorafit_versus": {}}
    fastest = max(trl, key=lambda row: row["tokens_per_s"])
    leanest = min(trl, key=lambda row: row["peak_rss_mb"])
    return {
        "configs": table,
        "reference": reference,
        "fastest_trl": fastest["config"],
        "leanest_trl": leanest["config"],
        "speedup_vs_fastest_trl": ours["tokens_per_s"] / fastest["tokens_per_s"],
        "memory_vs_fastest_trl": ours["peak_rss_mb"] / fastest["peak_rss_mb"],
        "speedup_vs_leanest_trl": ours["tokens_per_s"] / leanest["tokens_per_s"],
        "memory_vs_leanest_trl": ours["peak_rss_mb"] / leanest["peak_rss_mb"],
        "loss_gap_vs_fastest_trl": _loss_gap(ours, fastest),
        # every TRL configuration: (tokens/s ratio, peak memory ratio, mean |loss gap| per step)
        "versus": _versus(ours, trl),
        # the same for each lorafit configuration
        "lorafit_versus": {
            row["config"]: _versus(row, trl) for row in table.values() if row["side"] == "lorafit"
        },
    }


def _versus(ours: dict[str, Any], trl: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    return {
        row["config"]: {
            "speedup": ours["tokens_per_s"] / row["tokens_per_s"],
            "memory": ours["peak_rss_mb"] / row["peak_rss_mb"],
            "loss_gap": _loss_gap(ours, row),
        }
        for row in trl
    }


def _loss_gap(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Mean absolute difference of two median loss curves, step by step."""
    return statistics.mean(abs(x - y) for x, y in zip(a["loss"], b["loss"], strict=False))


def format_report(report: dict[str, Any]) -> str:
    s, c, p = report["summary"], report["ceiling"], report["parity"]
    reference_row = s["configs"]["lorafit:" + s.get("reference", LORAFIT_CONFIG)]
    lines = [
        f"lorafit bench: {report['model']}; {report['settings_line']}",
        f"machine: {report['machine']}",
        "",
        f"{'side':8} {'configuration':22} {'tokens/s':>8} {'runs':>18} {'peak RSS MB':>11} {'ceiling':>7} "
        f"{'real tok/step':>13} {'CPU s/step':>10} {'faults/step':>11} {'loss first->last':>17}",
    ]
    for row in s["configs"].values():
        runs = ", ".join(f"{x:.1f}" if x < 100 else f"{x:.0f}" for x in row["tokens_per_s_runs"])
        speed = f"{row['tokens_per_s']:8.1f}" if row["tokens_per_s"] < 100 else f"{row['tokens_per_s']:8.0f}"
        lines.append(
            f"{row['side']:8} {row['config']:22} {speed} {runs:>18} {row['peak_rss_mb']:11.0f} "
            f"{100 * row.get('ceiling_share', 0):6.0f}% {row['real_tokens_per_step']:13.0f} "
            f"{row['cpu_s_per_step']:10.1f} {row['faults_per_step']:11.0f} "
            f"{row['loss'][0]:8.3f}->{row['loss'][-1]:.3f}"
        )
    lines += (
        []
        if "fastest_trl" not in s
        else [
            "",
            f"lorafit {s.get('reference', LORAFIT_CONFIG)} vs PEFT+TRL's fastest ({s['fastest_trl']}): "
            f"{s['speedup_vs_fastest_trl']:.2f}x tokens/s, "
            f"{s['memory_vs_fastest_trl']:.2f}x peak memory; mean |loss gap| per step "
            f"{s['loss_gap_vs_fastest_trl']:.3f}",
            f"lorafit {s.get('reference', LORAFIT_CONFIG)} vs PEFT+TRL's leanest ({s['leanest_trl']}): "
            f"{s['speedup_vs_leanest_trl']:.2f}x tokens/s, "
            f"{s['memory_vs_leanest_trl']:.2f}x peak memory",
        ]
    )
    for ours, versus in s.get("lorafit_versus", {"defaults": s.get("versus", {})}).items():
        for config, v in versus.items():
            lines.append(
                f"  lorafit {ours} vs {config}: {v['speedup']:.2f}x tokens/s, {v['memory']:.2f}x peak "
                f"memory, mean |loss gap| per step {v['loss_gap']:.3f}"
            )
    lines += [
        "",
        f"ceiling: bf16 matmul {c['matmul_flops_per_s'] / 1e9:.0f} GFLOP/s (native bf16 "
        f"{c.get('native_bf16_flops_per_s', c['matmul_flops_per_s']) / 1e9:.0f}, as fp32 products "
        f"{c.get('widened_bf16_flops_per_s', c['matmul_flops_per_s']) / 1e9:.0f}) / "
        f"{c['flops_per_token'] / 1e6:.0f} MFLOP per trained token without recomputation = "
        f"{c['tokens_per_s']:.1f} tokens/s; lorafit reaches "
        f"{100 * reference_row['tokens_per_s'] / c['tokens_per_s']:.0f}% of it "
        f"(it skips the head for the {100 * (1 - c['label_token_share']):.0f}% of tokens without a label)",
    ]
    lines.append(
        "parity: not run (--parity-length 0)"
        if p is None
        else (
            f"parity on one batch of {p['tokens']} label tokens: loss lorafit {p['loss']['lorafit']:.5f}, "
            f"PEFT {p['loss']['peft']:.5f}, fp32 {p['loss']['fp32 reference']:.5f}; LoRA gradients, max "
            f"relative difference: lorafit-PEFT {p['lorafit_vs_peft']['grad_rel_max']:.4f}, lorafit-fp32 "
            f"{p['lorafit_vs_fp32']['grad_rel_max']:.4f}, PEFT-fp32 {p['peft_vs_fp32']['grad_rel_max']:.4f}: "
            + ("PASSED" if p["passed"] else "FAILED")
        )
    )
    if "minutes" in report:
        lines.append(f"the benchmark took {report['minutes']:.1f} minutes")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(report["summary"]["configs"].values())
    labels = [f"{r['side']}\n{r['config']}" for r in rows]
    colors = ["tab:green" if r["side"] == "lorafit" else "tab:gray" for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8), dpi=100)
    axes[0].bar(labels, [r["tokens_per_s"] for r in rows], color=colors)
    for x, r in enumerate(rows):
        axes[0].plot([x] * len(r["tokens_per_s_runs"]), r["tokens_per_s_runs"], "k.", ms=4)
    axes[0].axhline(report["ceiling"]["tokens_per_s"], color="tab:red", ls="--", lw=1, label="ceiling")
    axes[0].set_title("real tokens / s (median, dots: runs)")
    axes[0].legend()
    axes[1].bar(labels, [r["peak_rss_mb"] for r in rows], color=colors)
    axes[1].set_title("peak resident memory (MB)")
    for r in rows:
        axes[2].plot(range(1, len(r["loss"]) + 1), r["loss"], label=f"{r['side']} {r['config']}")
    axes[2].set_title("training loss (median over runs)")
    axes[2].set_xlabel("step")
    axes[2].legend(fontsize=7)
    for ax in axes[:2]:
        ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
