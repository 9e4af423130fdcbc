"""HTML report of an evaluation: PNG plots, metrics.json and a readable index.html.

The report consumes the dict returned by :func:`mlipuq.evaluation.evaluate`
(the numbers) plus, optionally, the raw arrays for the scatter plots. Plots
use matplotlib's Agg canvas on explicit ``Figure`` objects (no pyplot global
state, no change of the process-wide backend). The report directory is
written into a temporary sibling directory and renamed into place at the end,
so a half-written report never looks complete.
"""

from __future__ import annotations

import html
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from mlipuq.exceptions import InputError
from mlipuq.result import UQResult

__all__ = ["summary_text", "write_report"]

ALL = "all"
MAX_SCATTER_POINTS = 20000


def write_report(
    metrics: Mapping,
    out_dir: str | os.PathLike,
    *,
    results: Mapping[str, UQResult] | None = None,
    force_errors: np.ndarray | None = None,
    energy_errors: np.ndarray | None = None,
    config_index: np.ndarray | None = None,
    groups: Sequence | np.ndarray | None = None,
    title: str = "mlipuq evaluation",
    seed: int = 0,
) -> Path:
    """Write ``out_dir/index.html`` with plots and ``metrics.json``.

    Parameters
    ----------
    metrics : dict
        Output of :func:`mlipuq.evaluation.evaluate`.
    out_dir : path-like
        Report directory; replaced as a whole if it exists.
    results : dict of str -> UQResult, optional
        The evaluated results, for uncertainty-vs-error scatter plots.
    force_errors : ndarray, shape (N,), optional
        True force-error norms (eV/Å; NaN where unknown) for the atom scatter.
    energy_errors : ndarray, shape (C,), optional
        True energy errors (eV), used for a configuration scatter when no atom
        has a finite force error.
    config_index : ndarray of int, shape (N,), optional
        With ``groups``, colours the scatter points by group.
    groups : array-like of labels, shape (C,), optional
        Group per configuration.
    title : str
        Page title.
    seed : int
        Seed for subsampling scatter plots to at most 20000 points.

    Returns
    -------
    Path
        ``out_dir / "index.html"``.
    """
    if "methods" not in metrics:
        raise InputError("metrics: expected the dict returned by evaluate() (no 'methods' key)")
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes 0700; a report is meant to be read by others
        figures = _calibration_plots(metrics, tmp)
        figures += _scatter_plots(
            results, force_errors, energy_errors, config_index, groups, tmp, seed
        )
        figures += _detection_plot(metrics, tmp)
        figures += _cost_plot(metrics, tmp)
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        (tmp / "index.html").write_text(_html(metrics, figures, title))
        _swap_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir / "index.html"


def _swap_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename ``tmp`` onto ``out_dir``; an existing ``out_dir`` is moved aside first."""
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent))
        os.replace(out_dir, old / out_dir.name)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------
# Plots (each returns a list of (file name, caption))
# ---------------------------------------------------------------------------


def _figure(width: float = 5.5, height: float = 4.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, format="png")


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def _groups_of(method: Mapping) -> list[str]:
    labels = [g for g in method["metrics"] if g != ALL]
    return labels or [ALL]


def _calibration_plots(metrics: Mapping, out: Path) -> list[tuple[str, str]]:
    figures = []
    for name, method in metrics["methods"].items():
        per_group = method["metrics"]
        if not any(m.get("calibration_curve") for m in per_group.values()):
            continue
        fig = _figure()
        ax = fig.add_subplot()
        ax.plot([0, 1], [0, 1], "--", color="tab:red", lw=1, label="ideal (y = x)")
        for label in [*_groups_of(method), ALL] if len(per_group) > 1 else [ALL]:
            entry = per_group[label]
            curve = entry.get("calibration_curve")
            if not curve:
                continue
            pred = np.array([np.nan if v is None else v for v in curve["predicted"]])
            obs = np.array([np.nan if v is None else v for v in curve["observed"]])
            keep = np.isfinite(pred)
            style = {"color": "black", "lw": 2} if label == ALL else {}
            ax.plot(
                pred[keep],
                obs[keep],
                "o-",
                ms=3,
                label=f"{label} (ECE {entry['ece']:.3f})",
                **style,
            )
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("predicted p")
        ax.set_ylabel("observed fraction with error <= atol")
        ax.set_title(f"Calibration: {name}")
        ax.legend(fontsize=7, loc="upper left")
        file = f"calibration_{_safe(name)}.png"
        _save(fig, out / file)
        figures.append((file, f"Calibration curves of {name} per group (atoms binned by p)."))
    return figures


def _scatter_plots(results, force_errors, energy_errors, config_index, groups, out, seed):
    if not results:
        return []
    rng = np.random.default_rng(seed)
    figures = []
    atom_groups = None
    if groups is not None and config_index is not None:
        atom_groups = np.asarray(groups).astype(str)[np.asarray(config_index)]
    for name, result in results.items():
        x, y, colour, level = _scatter_data(
            result, force_errors, energy_errors, atom_groups, groups
        )
        if x is None:
            continue
        if len(x) > MAX_SCATTER_POINTS:
            pick = rng.choice(len(x), MAX_SCATTER_POINTS, replace=False)
            x, y = x[pick], y[pick]
            colour = None if colour is None else colour[pick]
        fig = _figure()
        ax = fig.add_subplot()
        if colour is None:
            ax.scatter(x, y, s=3, alpha=0.4)
        else:
            for label in np.unique(colour):
                sel = colour == label
                ax.scatter(x[sel], y[sel], s=3, alpha=0.4, label=str(label))
            ax.legend(fontsize=7, markerscale=3)
        if np.all(x > 0) and x.max() / x.min() > 20:
            ax.set_xscale("log")
        if np.all(y > 0) and y.max() / y.min() > 20:
            ax.set_yscale("log")
        unit = f" ({result.unit})" if result.unit else ""
        ax.set_xlabel(f"{name} uncertainty{unit}")
        ax.set_ylabel("force error (eV/Å)" if level == "atom" else "|energy error| (eV)")
        ax.set_title(f"{name}: uncertainty vs true error ({level} level)")
        file = f"scatter_{_safe(name)}.png"
        _save(fig, out / file)
        figures.append((file, f"{name}: uncertainty against true error, one point per {level}."))
    return figures


def _scatter_data(result, force_errors, energy_errors, atom_groups, groups):
    if force_errors is not None:
        errors = np.asarray(force_errors, dtype=float)
        keep = np.isfinite(errors) & np.isfinite(result.atom_uncertainty)
        if np.any(keep):
            colour = None if atom_groups is None else atom_groups[keep]
            return np.asarray(result.atom_uncertainty)[keep], errors[keep], colour, "atom"
    if energy_errors is not None and result.config_uncertainty is not None:
        errors = np.abs(np.asarray(energy_errors, dtype=float))
        u = np.asarray(result.extras.get("config_energy_uncertainty", result.config_uncertainty))
        keep = np.isfinite(errors) & np.isfinite(u)
        if np.any(keep):
            colour = None if groups is None else np.asarray(groups).astype(str)[keep]
            return u[keep], errors[keep], colour, "configuration"
    return None, None, None, None


def _detection_plot(metrics: Mapping, out: Path) -> list[tuple[str, str]]:
    rows = []
    for name, method in metrics["methods"].items():
        rates = {g: method["metrics"][g].get("detection_rate_config") for g in _groups_of(method)}
        atom = {g: method["metrics"][g].get("detection_rate_atom") for g in _groups_of(method)}
        if any(v is not None for v in rates.values()):
            rows.append((name, rates, atom))
    if not rows:
        return []
    labels = list(rows[0][1])
    fig = _figure(max(5.5, 1.2 * len(labels) + 2), 5.5)
    width = 0.8 / len(rows)
    x = np.arange(len(labels))
    for level, ax in zip(("configuration", "atom"), fig.subplots(2, 1, sharex=True), strict=True):
        for i, (name, rates, atom) in enumerate(rows):
            values = rates if level == "configuration" else atom
            heights = [100 * (values.get(g) or 0.0) for g in labels]
            ax.bar(x + (i - (len(rows) - 1) / 2) * width, heights, width, label=name)
        ax.set_ylabel(f"% {level}s flagged")
        ax.set_ylim(0, 122)
        ax.set_yticks([0, 20, 40, 60, 80, 100])
    ax.set_xticks(x, labels, rotation=20, ha="right")
    fig.axes[0].legend(fontsize=7, ncol=min(len(rows), 4), loc="upper center")
    fig.axes[0].set_title("Detection rate per group (at each method's threshold)")
    _save(fig, out / "detection_rates.png")
    return [("detection_rates.png", "Share of configurations / atoms each method flags.")]


def _cost_plot(metrics: Mapping, out: Path) -> list[tuple[str, str]]:
    costs = {
        name: m["cost"]["seconds_per_atom"]
        for name, m in metrics["methods"].items()
        if m.get("cost", {}).get("seconds_per_atom") is not None
    }
    if not costs:
        return []
    fig = _figure(5.5, 3.5)
    ax = fig.add_subplot()
    names = list(costs)
    bars = ax.bar(names, [1e6 * costs[n] for n in names], color="tab:gray")
    relative = {n: m["cost"].get("relative_to_forward") for n, m in metrics["methods"].items()}
    labels = ["" if relative.get(n) is None else f"{relative[n]:.3g} × forward" for n in names]
    ax.bar_label(bars, labels, fontsize=8)
    if max(costs.values()) > 0 and min(costs.values()) > 0:
        ax.set_yscale("log")
    ax.set_ylabel("µs per atom")
    ax.set_title("Cost of the UQ step")
    _save(fig, out / "cost.png")
    return [("cost.png", "Wall time per atom of each method's UQ step.")]


# ---------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------


#: How the summary names the methods of the project (other names are used as given).
DISPLAY_NAMES = {
    "ltau": "LTAU",
    "ensemble": "Ensemble",
    "doptimality": "D-optimality",
    "clustered_doptimality": "Clustered D-optimality",
}


def _name(key: str) -> str:
    return DISPLAY_NAMES.get(key, key)


def _pct(value: float) -> str:
    return f"{100 * value:.0f} %"


def _per_group(metrics: Mapping, name: str, key: str) -> dict[str, float]:
    method = metrics["methods"][name]
    return {
        g: method["metrics"][g][key]
        for g in _groups_of(method)
        if method["metrics"][g].get(key) is not None
    }


def _overall(metrics: Mapping, key: str) -> dict[str, float]:
    return {
        name: m["metrics"][ALL][key]
        for name, m in metrics["methods"].items()
        if m["metrics"][ALL].get(key) is not None
    }


def summary_text(metrics: Mapping) -> str:
    """A plain-language paragraph reading the numbers of ``metrics``.

    Examples
    --------
    >>> m = {"methods": {"ltau": {"metrics": {"all": {"spearman_atom": 0.5}}}}}
    >>> summary_text(m)
    'LTAU ranks the atoms by error best (Spearman 0.50 between uncertainty and force error).'
    """
    sentences = []
    overall_ece = _overall(metrics, "ece")
    if overall_ece:
        best = min(overall_ece, key=overall_ece.get)
        text = (
            f"{_name(best)} has the lowest calibration error over all test atoms "
            f"(ECE {overall_ece[best]:.3f}"
        )
        per_group = _per_group(metrics, best, "ece")
        if len(per_group) > 1:
            g_worst = max(per_group, key=per_group.get)
            text += f"; worst group {g_worst}, ECE {per_group[g_worst]:.3f}"
        sentences.append(text + ").")
    rho = _overall(metrics, "spearman_atom")
    if rho:
        best = max(rho, key=rho.get)
        sentences.append(
            f"{_name(best)} ranks the atoms by error best (Spearman {rho[best]:.2f} between "
            "uncertainty and force error)."
        )
    for name in metrics["methods"]:
        rates = _per_group(metrics, name, "detection_rate_config")
        if len(rates) > 1:
            hi, lo = max(rates, key=rates.get), min(rates, key=rates.get)
            sentences.append(
                f"{_name(name)} flags {_pct(rates[hi])} of the {hi} configurations and "
                f"{_pct(rates[lo])} of the {lo} ones."
            )
        elif rates:
            ((g, r),) = rates.items()
            sentences.append(f"{_name(name)} flags {_pct(r)} of the configurations.")
    auc = _overall(metrics, "roc_auc")
    if auc:
        best = max(auc, key=auc.get)
        sentences.append(
            f"{_name(best)} separates out-of-domain configurations best (ROC-AUC {auc[best]:.2f})."
        )
    rel = {
        n: m["cost"].get("relative_to_forward")
        for n, m in metrics["methods"].items()
        if m.get("cost", {}).get("relative_to_forward") is not None
    }
    if rel:
        cheap = min(rel, key=rel.get)
        sentences.append(
            f"{_name(cheap)} is the cheapest: its UQ step costs {rel[cheap]:.3g} × "
            "one forward pass."
        )
    return " ".join(sentences) if sentences else "No metric could be computed."


_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; } h2 { font-size: 1.2em; margin-top: 1.8em; }
p.summary { background: #f3f6fa; border-left: 4px solid #3b6ea5; padding: .8em 1em; }
table { border-collapse: collapse; font-size: .9em; margin: .5em 0; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: right; }
th { background: #eef1f5; } td.l, th.l { text-align: left; }
figure { display: inline-block; margin: .5em; vertical-align: top; max-width: 520px; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: .85em; color: #555; }
"""

_COLUMNS = [
    ("spearman_atom", "Spearman (atom)", "{:.2f}"),
    ("spearman_config_force", "Spearman (config, forces)", "{:.2f}"),
    ("spearman_config_energy", "Spearman (config, energy)", "{:.2f}"),
    ("detection_rate_atom", "flagged atoms", "pct"),
    ("detection_rate_config", "flagged configs", "pct"),
    ("roc_auc", "ROC-AUC", "{:.2f}"),
    ("ece", "ECE", "{:.3f}"),
    ("sharpness", "sharpness (std p)", "{:.3f}"),
]


def _cell(value: object, fmt: str) -> str:
    if value is None:
        return "–"
    return _pct(value) if fmt == "pct" else fmt.format(value)


def _table(metrics: Mapping) -> str:
    used = [
        c
        for c in _COLUMNS
        if _overall(metrics, c[0]) or any(_per_group(metrics, n, c[0]) for n in metrics["methods"])
    ]
    head = "".join(f"<th>{html.escape(label)}</th>" for _, label, _ in used)
    rows = []
    for name, method in metrics["methods"].items():
        for group, entry in method["metrics"].items():
            cells = "".join(f"<td>{_cell(entry.get(key), fmt)}</td>" for key, _, fmt in used)
            rows.append(
                f"<tr><td class='l'>{html.escape(name)}</td>"
                f"<td class='l'>{html.escape(group)}</td>"
                f"<td>{entry.get('n_configs', '')}</td>{cells}</tr>"
            )
    return (
        f"<table><tr><th class='l'>method</th><th class='l'>group</th><th>configs</th>"
        f"{head}</tr>{''.join(rows)}</table>"
    )


def _html(metrics: Mapping, figures: list[tuple[str, str]], title: str) -> str:
    atol = metrics.get("atol")
    facts = f"{metrics.get('n_configs', '?')} configurations, {metrics.get('n_atoms', '?')} atoms"
    if atol is not None:
        facts += f", atol = {atol:.4g} eV/Å"
    figs = "\n".join(
        f"<figure><img src='{html.escape(file)}' alt='{html.escape(caption)}'>"
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        for file, caption in figures
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{_CSS}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p>{html.escape(facts)}.</p>
<p class="summary">{html.escape(summary_text(metrics))}</p>
<h2>Metrics</h2>
{_table(metrics)}
<p>Spearman: rank correlation of uncertainty and true error (1 = perfect ranking).
Flagged: share above the method's threshold. ECE: mean gap between predicted p and
the observed share of atoms with error &le; atol (0 = calibrated; a calibrated method
predicts p with its fitted scale factor s).
All numbers are in <a href="metrics.json">metrics.json</a>.</p>
<h2>Plots</h2>
{figs}
</body></html>
"""
