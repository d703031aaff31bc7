"""The evaluation's outputs: `evaluation.json`, `evaluation.png` and a short summary table.

The plot is the learning curve, the one picture that answers "did pretraining help, and how
much with few labels": probe accuracy against the fraction of labeled training cases, the
pretrained encoder (solid) against the same architecture at random init (dashed), spread over
the splits as error bars, chance as a dotted line. One panel per probe task.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from nnssl.io_utils import atomic_path, write_json

JSON_NAME = "evaluation.json"
PLOT_NAME = "evaluation.png"
# (key in the encoder's results, metric plotted, panel title)
PANELS = (("volume_probe", "accuracy", "volume label ({pooling} features)"),
          ("token_probe", "balanced_accuracy", "label map per token ({readout} tokens)"),
          ("context_probe", "balanced_accuracy", "context labels per token ({readout} tokens)"))
# baselines drawn into the token and context panels: (name in evaluation.json, legend, line style)
BASELINE_LINES = (("raw_cell_statistics", "own cell's intensity statistics", (0, (1, 1))),
                  ("raw_cell_voxels_and_position", "own cell's voxels + position", (0, (3, 1, 1, 1))),
                  ("context_oracle", "context oracle (5x5x5 cells + position)", (0, (5, 2))))


def write_report(result: dict[str, Any], out_folder: Path, plot: bool = True) -> dict[str, Path]:
    """Write `evaluation.json` (and `evaluation.png`) into `out_folder`; returns their paths."""
    out_folder.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_folder / JSON_NAME}
    write_json(paths["json"], json_safe(result))
    if plot:
        paths["plot"] = out_folder / PLOT_NAME
        plot_learning_curves(result, paths["plot"])
    return paths


def json_safe(value: Any) -> Any:
    """Non-finite floats (RankMe of diverged, non-finite features) become null: strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def plot_learning_curves(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window, works without a display
    import matplotlib.pyplot as plt

    encoders = result["encoders"]
    panels = [p for p in PANELS if p[0] in encoders["pretrained"]]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.0), squeeze=False)
    for ax, (key, metric, title) in zip(axes[0], panels):
        for name, style in (("pretrained", "-o"), ("random", "--s")):
            curve = encoders[name][key]["learning_curve"]
            x = [p["fraction"] for p in curve]
            ax.errorbar(x, [p[metric] for p in curve], yerr=[p[f"{metric}_std"] for p in curve], fmt=style,
                        capsize=3, label=f"{name} ({curve[-1][metric]:.3f})")
        chance = encoders["pretrained"][key]["chance_accuracy"] if metric == "accuracy" else None
        if chance is not None:
            ax.axhline(chance, color="grey", linestyle=":", label=f"majority class ({chance:.3f})")
        balanced_chance = encoders["pretrained"][key].get("chance_balanced_accuracy")
        if metric == "balanced_accuracy" and balanced_chance is not None:
            ax.axhline(balanced_chance, color="grey", linestyle=":", label=f"chance ({balanced_chance:.3f})")
        for name, legend, style in BASELINE_LINES:
            line = result.get("baselines", {}).get(key, {}).get(name)
            if line is not None:
                ax.axhline(line[metric], color="tab:green", linestyle=style, linewidth=1,
                           label=f"{legend} ({line[metric]:.3f})")
        ax.set_xscale("log")
        ticks = [p["fraction"] for p in encoders["pretrained"][key]["learning_curve"]]
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("fraction of labeled training cases")
        ax.set_ylabel(metric.replace("_", " "))
        pooling = {"mean": "mean-pooled", "layers": "multi-layer mean-pooled"}.get(
            encoders["pretrained"][key].get("pooling", "mean"), "pooled")
        readout = {"final": "final-layer", "layers": "multi-layer"}.get(
            encoders["pretrained"][key].get("readout", "final"), "")
        ax.set_title(title.format(pooling=pooling, readout=readout), fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{Path(result['checkpoint']).name}: pretrained vs random init", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def format_summary(result: dict[str, Any]) -> str:
    """A few lines for the terminal: collapse statistics and probe results side by side."""
    enc = result["encoders"]
    rows = [("pooled RankMe", "collapse", "pooled_rankme"), ("token RankMe", "collapse", "token_rankme"),
            ("pooled feature std", "collapse", "pooled_feature_std"),
            ("token feature std", "collapse", "token_feature_std"),
            ("cosine across volumes", "collapse", "cos_across")]
    if "volume_probe" in enc["pretrained"]:
        pooling = enc["pretrained"]["volume_probe"].get("pooling", "mean")
        rows.append((f"volume probe accuracy ({pooling})", "volume_probe", "accuracy"))
    if "token_probe" in enc["pretrained"]:
        readout = enc["pretrained"]["token_probe"].get("readout", "final")
        rows += [("token probe accuracy", "token_probe", "accuracy"),
                 (f"token probe bal. acc. ({readout})", "token_probe", "balanced_accuracy")]
    if "context_probe" in enc["pretrained"]:
        rows.append((f"context probe bal. acc. ({enc['pretrained']['context_probe'].get('readout', 'final')})",
                     "context_probe", "balanced_accuracy"))
    data = result["data"]
    encoder = result["encoder"]
    shape = "x".join(map(str, encoder["patch_size"]))
    lines = [(f"{encoder['arch_class_name']} ({encoder['family']}, input {shape}, E={encoder['embed_dim']}) on "
              f"{data['num_cases']} cases, {result['probe_config']['num_splits']} splits"),
             f"{'':34s}{'pretrained':>12s}{'random':>12s}"]
    for label, section, key in rows:
        lines.append(f"{label:34s}{enc['pretrained'][section][key]:12.3f}{enc['random'][section][key]:12.3f}")
    for probe, names in result.get("baselines", {}).items():
        scores = ", ".join(f"{name.replace('_', ' ')} {entry['balanced_accuracy']:.3f}"
                           for name, entry in names.items())
        chance = enc["pretrained"][probe].get("chance_balanced_accuracy")
        shown_chance = "" if chance is None else f", chance {chance:.3f}"
        lines.append(f"{probe.replace('_', ' ')} baselines (balanced acc.{shown_chance}): "
                     f"{scores}")
    for key, value in result.get("pretrained_minus_random", {}).items():
        lines.append(f"pretrained - random, {key.replace('_', ' ')}: {100 * value:+.1f} points")
    if "protocol" in result:
        which = result["protocol"]["labeled_set"]
        lines.append(f"protocol {result['protocol']['name']} on "
                     f"{'its ' + which + ' set' if which else 'a set that is not one of its labeled sets'}")
    return "\n".join(lines)
