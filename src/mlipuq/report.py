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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

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
    from mlipuq.io import atomic_directory

    out_dir = Path(out_dir)
    with atomic_directory(out_dir, marker="metrics.json") as tmp:
        figures = _calibration_plots(metrics, tmp)
        figures += _scatter_plots(
            results, force_errors, energy_errors, config_index, groups, tmp, seed
        )
        figures += _detection_plot(metrics, tmp)
        figures += _cost_plot(metrics, tmp)
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        (tmp / "index.html").write_text(_html(metrics, figures, title))
    return out_dir / "index.html"


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
        fig = _figure(7.0, 4.0)
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
        ax.set_ylabel("observed share with |ΔF| <= atol")
        ax.set_title(f"Calibration: {name}", fontsize=10)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
        file = f"calibration_{_safe(name)}.png"
        _save(fig, out / file)
        figures.append((file, f"Calibration curves of {name} per group (atoms binned by p)."))
    return figures


def _scatter_plots(results, force_errors, energy_errors, config_index, groups, out, seed):
    """Per method: atoms with forces (force error), and configurations without forces
    (energy error), each coloured by test set."""
    if not results:
        return []
    rng = np.random.default_rng(seed)
    figures = []
    labels = None if groups is None else np.asarray(groups).astype(str)
    atom_groups = None
    if labels is not None and config_index is not None:
        atom_groups = labels[np.asarray(config_index)]
    for name, result in results.items():
        for level, x, y, colour in _scatter_data(result, force_errors, energy_errors,
                                                 atom_groups, labels, config_index):
            if len(x) > MAX_SCATTER_POINTS:
                pick = rng.choice(len(x), MAX_SCATTER_POINTS, replace=False)
                x, y = x[pick], y[pick]
                colour = None if colour is None else colour[pick]
            fig = _figure(6.5, 4.0)
            ax = fig.add_subplot()
            if colour is None:
                ax.scatter(x, y, s=3, alpha=0.4)
            else:
                for label in np.unique(colour):
                    sel = colour == label
                    ax.scatter(x[sel], y[sel], s=4 if level == "atom" else 12, alpha=0.5,
                               label=str(label))
                ax.legend(fontsize=7, markerscale=2, loc="upper left",
                          bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
            if np.all(x > 0) and x.max() / x.min() > 20:
                ax.set_xscale("log")
            if np.all(y > 0) and y.max() / y.min() > 20:
                ax.set_yscale("log")
            unit = f" ({result.unit})" if result.unit else ""
            ax.set_xlabel(f"{name} uncertainty{unit}")
            if level == "atom":
                ax.set_ylabel("force error |ΔF| (eV/Å)")
                file = f"scatter_{_safe(name)}.png"
                caption = f"{name}: uncertainty against force error, one point per atom."
            else:
                ax.set_ylabel("|energy error| (eV)")
                file = f"scatter_energy_{_safe(name)}.png"
                caption = (f"{name}: configuration uncertainty against energy error, sets "
                           "without reference forces, one point per configuration.")
            ax.set_title(f"{name}: uncertainty vs true error ({level} level)", fontsize=10)
            _save(fig, out / file)
            figures.append((file, caption))
    return figures


def _scatter_data(result, force_errors, energy_errors, atom_groups, groups, config_index):
    """(level, uncertainty, error, colour) for atoms with forces and for configurations
    without forces (energy errors)."""
    out = []
    has_forces = None
    if force_errors is not None:
        errors = np.asarray(force_errors, dtype=float)
        keep = np.isfinite(errors) & np.isfinite(result.atom_uncertainty)
        if np.any(keep):
            colour = None if atom_groups is None else atom_groups[keep]
            out.append(("atom", np.asarray(result.atom_uncertainty)[keep], errors[keep],
                        colour))
        if config_index is not None:
            n_configs = int(np.max(config_index)) + 1
            has_forces = np.bincount(config_index, np.isfinite(errors), n_configs) > 0
    config_u = result.config_uncertainty
    if config_u is None and config_index is not None:  # the max over atoms, as evaluate()
        from mlipuq.metrics import config_aggregate

        config_u = config_aggregate(np.asarray(result.atom_uncertainty, float),
                                    np.asarray(config_index), how="max")
    if energy_errors is not None and config_u is not None:
        errors = np.abs(np.asarray(energy_errors, dtype=float))
        u = np.asarray(result.extras.get("config_energy_uncertainty", config_u))
        keep = np.isfinite(errors) & np.isfinite(u)
        if has_forces is not None:
            keep &= ~has_forces
        if np.any(keep) and (has_forces is not None or not out):
            colour = None if groups is None else groups[keep]
            out.append(("configuration", u[keep], errors[keep], colour))
    return out


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
    fig = _figure(max(6.5, 1.2 * len(labels) + 3.5), 5.5)
    width = 0.8 / len(rows)
    x = np.arange(len(labels))
    for level, ax in zip(("configuration", "atom"), fig.subplots(2, 1, sharex=True), strict=True):
        for i, (name, rates, atom) in enumerate(rows):
            values = rates if level == "configuration" else atom
            heights = [np.nan if values.get(g) is None else 100 * values[g] for g in labels]
            ax.bar(x + (i - (len(rows) - 1) / 2) * width, heights, width, label=name)
        ax.set_ylabel(f"% {level}s flagged")
        ax.set_ylim(0, 105)
        ax.set_yticks([0, 20, 40, 60, 80, 100])
    ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=8)
    fig.axes[0].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0),
                       borderaxespad=0)
    fig.axes[0].set_title("Share flagged per set (at each method's threshold)", fontsize=10)
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
    fig = _figure(6.0, 4.0)
    ax = fig.add_subplot()
    names = list(costs)
    bars = ax.bar(range(len(names)), [1e6 * costs[n] for n in names], color="tab:gray")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
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
    "ltau": "LTAU (uncalibrated)",
    "ltau_calibrated": "LTAU (calibrated)",
    "knn_distance": "k-NN distance",
    "ensemble": "Ensemble",
    "doptimality": "D-optimality",
    "clustered_doptimality": "Clustered D-optimality",
}

ATOL_DEFINITION = (
    "atol: the force-error tolerance of the probabilities p = P(|F_ref - F_pred| <= atol), "
    "a norm per atom in eV/Å (not the per-component MAE that training logs print); each "
    "method's ECE uses its own atol"
)


def _name(key: str) -> str:
    """Display name of a result: the table above, a calibrated variant, the method
    class's ``display_name``, else the key."""
    if key in DISPLAY_NAMES:
        return DISPLAY_NAMES[key]
    if key.endswith("_calibrated"):
        return f"{_name(key[: -len('_calibrated')])} (calibrated)"
    return _method_name(key)


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
        if m["metrics"].get(ALL, {}).get(key) is not None
    }


def _set_roles(metrics: Mapping) -> tuple[list[str], list[str]]:
    """(in-domain sets, out-of-domain sets), from ``test_sets`` or the OOD metrics."""
    table = metrics.get("test_sets") or {}
    if table:
        inside = [n for n, t in table.items() if t.get("in_domain")]
        return inside, [n for n in table if n not in inside]
    inside, outside = [], []
    for method in metrics["methods"].values():
        for group, entry in method["metrics"].items():
            if group == ALL or entry.get("in_domain") is None:
                continue
            (inside if entry["in_domain"] else outside).append(group)
    return list(dict.fromkeys(inside)), list(dict.fromkeys(outside))


def _calibration_sentence(metrics: Mapping) -> str | None:
    """The calibrated LTAU's ECE on held-out in-domain atoms and on its worst set."""
    name = next((n for n in metrics["methods"] if n.endswith("_calibrated")
                 and _per_group(metrics, n, "ece")), None)
    if name is None:
        candidates = [n for n in metrics["methods"] if _per_group(metrics, n, "ece")]
        if not candidates:
            return None
        name = candidates[0]
    per_set = _per_group(metrics, name, "ece")
    if not per_set:
        overall = _overall(metrics, "ece").get(name)
        if overall is None:
            return None
        return f"{_name(name)} has a calibration error (ECE) of {overall:.3f}."
    worst = max(per_set, key=per_set.get)
    inside, _ = _set_roles(metrics)
    held = [g for g in inside if g in per_set]
    if len(per_set) == 1:
        return f"{_name(name)} has a calibration error (ECE) of {per_set[worst]:.3f} on {worst}."
    text = f"{_name(name)} has its largest calibration error on {worst} (ECE {per_set[worst]:.3f})"
    if held and worst not in held:
        best_in = max(held, key=per_set.get)
        text += f"; on the held-out in-domain atoms of {best_in} it is {per_set[best_in]:.3f}"
    return text + "."


def _ranking_sentence(metrics: Mapping) -> str | None:
    """Which method ranks atoms by force error best on its worst set (never pooled)."""
    worst_rho = {}
    for name in metrics["methods"]:
        per_set = _per_group(metrics, name, "spearman_atom")
        if per_set:
            g = min(per_set, key=per_set.get)
            worst_rho[name] = (per_set[g], g, len(per_set))
    if not worst_rho:
        return None
    best = max(worst_rho, key=lambda n: worst_rho[n][0])
    value, group, n_sets = worst_rho[best]
    where = f"on {group}" if n_sets == 1 else f"even on its worst set, {group}"
    return (f"{_name(best)} ranks atoms by force error best ({where}: Spearman "
            f"{value:.2f} between uncertainty and force error).")


def _detection_sentences(metrics: Mapping) -> list[str]:
    """Per out-of-domain set: the best separating method, its ROC-AUC, TPR and the FPR."""
    inside, outside = _set_roles(metrics)
    if not inside or not outside:
        return []
    sentences = []
    for group in outside:
        auc = {n: m["metrics"][group]["roc_auc"] for n, m in metrics["methods"].items()
               if m["metrics"].get(group, {}).get("roc_auc") is not None}
        if not auc:
            continue
        best = max(auc, key=auc.get)
        entry = metrics["methods"][best]["metrics"][group]
        text = (f"{group}: {_name(best)} separates it from the in-domain data best "
                f"(ROC-AUC {auc[best]:.2f}")
        if entry.get("tpr") is not None and entry.get("fpr") is not None:
            text += (f"; at its threshold it flags {_pct(entry['tpr'])} of these "
                     f"configurations and {_pct(entry['fpr'])} of the in-domain ones")
        sentences.append(text + ").")
    return sentences


def _energy_only_sentence(metrics: Mapping) -> str | None:
    table = metrics.get("test_sets") or {}
    energy_only = [n for n, t in table.items() if not t.get("has_forces")]
    if not energy_only:
        return None
    names = ", ".join(energy_only)
    verb = "has" if len(energy_only) == 1 else "have"
    return (f"{names} {verb} no reference forces: judged on configuration energy errors "
            "only (no ECE, no atom ranking).")


def _cost_sentence(metrics: Mapping) -> str | None:
    rel = {
        n: m["cost"].get("relative_to_forward")
        for n, m in metrics["methods"].items()
        if m.get("cost", {}).get("relative_to_forward") is not None
    }
    if not rel:
        return None
    cheap = min(rel, key=rel.get)
    return f"{_name(cheap)} is the cheapest: its UQ step costs {rel[cheap]:.3g} × one forward pass."


def summary_text(metrics: Mapping) -> str:
    """A plain-language paragraph reading the numbers of ``metrics``.

    Every claim is made per test set: calibration names the worst set, the atom
    ranking is judged on each method's worst set, detection is given per
    out-of-domain set with the true-positive rate next to the in-domain
    false-positive rate at the method's threshold. No claim rests on a figure
    pooled over sets.

    Examples
    --------
    >>> m = {"methods": {"ltau": {"metrics": {"all": {}, "300K": {"spearman_atom": 0.5}}}}}
    >>> summary_text(m).split(" (")[0]
    'LTAU'
    """
    sentences = [
        _calibration_sentence(metrics),
        _ranking_sentence(metrics),
        *_detection_sentences(metrics),
        _energy_only_sentence(metrics),
        _cost_sentence(metrics),
    ]
    sentences = [s for s in sentences if s]
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
p.warn { background: #fff4e5; border-left: 4px solid #d9822b; padding: .5em 1em; }
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


def _fmt(value: object, fmt: str = "{:.3f}") -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "–"
    return fmt.format(value)


def _test_set_section(metrics: Mapping) -> str:
    table = metrics.get("test_sets") or {}
    if not table:
        return ""
    models = [k for k in next(iter(table.values())) if isinstance(
        next(iter(table.values()))[k], dict)]
    head = "".join(
        f"<th>{html.escape(m)}: force MAE per component (eV/Å)</th>"
        f"<th>{html.escape(m)}: force MAE of |ΔF| (eV/Å)</th>"
        f"<th>{html.escape(m)}: energy MAE (meV/atom)</th>" for m in models)
    rows = []
    for name, entry in table.items():
        cells = "".join(
            f"<td>{_fmt(entry[m]['force_mae_component'], '{:.4f}')}</td>"
            f"<td>{_fmt(entry[m]['force_mae_norm'], '{:.4f}')}</td>"
            f"<td>{_fmt(None if entry[m]['energy_mae_per_atom'] is None else 1000 * entry[m]['energy_mae_per_atom'], '{:.2f}')}</td>"  # noqa: E501
            for m in models)
        role = "in domain" if entry.get("in_domain") else "out of domain"
        data = "forces + energies" if entry.get("has_forces") else "energies only"
        rows.append(f"<tr><td class='l'>{html.escape(name)}</td><td class='l'>{role}</td>"
                    f"<td class='l'>{data}</td><td>{entry['n_configs']}</td>"
                    f"<td>{entry['n_atoms']}</td>{cells}</tr>")
    return ("<h2>Test sets</h2><table><tr><th class='l'>set</th><th class='l'>role</th>"
            "<th class='l'>reference</th><th>configs</th><th>atoms</th>"
            f"{head}</tr>{''.join(rows)}</table>"
            "<p>Held-out configurations only (the calibration part of the calibration set is "
            "excluded). Force MAE per component: mean |ΔF_x|, |ΔF_y|, |ΔF_z|; of |ΔF|: mean "
            "force-error norm per atom.</p>")


def _detection_section(metrics: Mapping) -> str:
    inside, outside = _set_roles(metrics)
    if not inside or not outside:
        return ""
    thresholds = metrics.get("thresholds") or {}
    head = "".join(f"<th>{html.escape(g)}: ROC-AUC</th><th>{html.escape(g)}: TPR</th>"
                   for g in outside)
    rows = []
    for name, method in metrics["methods"].items():
        per = method["metrics"]
        fprs = [per[g]["fpr"] for g in inside if per.get(g, {}).get("fpr") is not None]
        fpr = None if not fprs else float(np.mean(fprs))
        info = thresholds.get(name, {})
        source = info.get("source", "")
        if source == "fitted":
            source = f"fitted at FPR {_pct(info['fpr'])} on {info['calibration_set']}"
        cells = "".join(
            f"<td>{_fmt(per.get(g, {}).get('roc_auc'), '{:.2f}')}</td>"
            f"<td>{_fmt(per.get(g, {}).get('tpr'), '{:.0%}')}</td>" for g in outside)
        rows.append(f"<tr><td class='l'>{html.escape(name)}</td>"
                    f"<td>{_fmt(method.get('threshold'), '{:.4g}')}</td>"
                    f"<td class='l'>{html.escape(source)}</td>"
                    f"<td>{_fmt(fpr, '{:.0%}')}</td>{cells}</tr>")
    return ("<h2>Out-of-domain detection</h2><table><tr><th class='l'>method</th>"
            "<th>threshold</th><th class='l'>threshold from</th>"
            f"<th>in-domain FPR (held out)</th>{head}</tr>{''.join(rows)}</table>"
            f"<p>In domain: {html.escape(', '.join(inside))}. Each out-of-domain set is "
            "scored against all held-out in-domain configurations on the configuration "
            "uncertainty. TPR: share of its configurations flagged at the threshold; FPR: "
            "share of held-out in-domain configurations flagged.</p>")


def _calibration_section(metrics: Mapping) -> str:
    """One table per calibrated method: ECE before and after on every held-out set."""
    return "".join(_one_calibration(name, cal)
                   for name, cal in (metrics.get("calibration") or {}).items() if cal)


def _one_calibration(name: str, cal: Mapping) -> str:
    ece_before, ece_after = cal.get("ece_before"), cal.get("ece_after")
    scale = cal.get("scale")
    bound = ""
    if cal.get("at_bound"):
        bound = (f"<p class='warn'>The fitted scale s = {scale:.3g} lies at the bound "
                 f"of its search interval {cal['bounds']}: the calibration data may not be in "
                 "domain, or the model's errors are far from its training errors.</p>")
    where = (f"fitted on {cal['fraction']:.0%} of the configurations of "
             f"<b>{html.escape(str(cal['calibration_set']))}</b> "
             f"({cal.get('n_atoms', '?')} atoms, seed {cal['seed']})")
    if scale is not None and "distance_power" in cal:
        how = (f"Scale factor s = {scale:.3g} {where} by minimising the ECE; "
               f"p = CDF of the neighbours' training errors at atol / s_j with s_j = s x "
               f"max(1, z)^beta (z: normalised k-NN distance, beta = "
               f"{cal['distance_power']:g}).")
    else:
        fitted = ", ".join(f"{k} = {v:.4g}" for k, v in cal.items()
                           if isinstance(v, float) and k not in
                           ("fraction", "atol", "fpr", "threshold") and not k.startswith("ece"))
        how = f"Calibration {where}{': ' + html.escape(fitted) if fitted else ''}."
    atol = f" atol = {cal['atol']:.4g} eV/Å." if cal.get("atol") is not None else ""
    table = ""
    if isinstance(ece_before, Mapping) and isinstance(ece_after, Mapping):
        rows = "".join(
            f"<tr><td class='l'>{html.escape(group)}</td><td>{_fmt(ece_before[group])}</td>"
            f"<td>{_fmt(ece_after.get(group))}</td></tr>" for group in ece_before)
        table = ("<p>ECE on the held-out configurations of every set with forces:</p>"
                 f"{bound}<table><tr><th class='l'>test set</th><th>ECE before</th>"
                 f"<th>ECE after</th></tr>{rows}</table>")
    return (f"<h2>{html.escape(_method_name(name))} calibration</h2><p>{how}{atol}</p>"
            f"{table or bound}")


def _method_name(name: str) -> str:
    """The method class's display name (the key for unregistered names)."""
    from mlipuq.registry import method_class

    try:
        return method_class(name).display_name or name
    except InputError:
        return name


SECTIONS: list = [_test_set_section, _detection_section, _calibration_section]
"""The report's sections after the summary, in order: callables ``metrics -> HTML``.
Add one with :func:`register_section`."""


def register_section(section, *, before: Any = None) -> None:
    """Add a report section: ``section(metrics) -> str`` (HTML; "" to skip), placed
    before the section ``before`` (default: after the others)."""
    if not callable(section):
        raise TypeError(f"section: expected a callable metrics -> HTML, got {section!r}")
    if section in SECTIONS:
        return
    SECTIONS.insert(SECTIONS.index(before) if before in SECTIONS else len(SECTIONS), section)


def _run_section(metrics: Mapping) -> str:
    run = metrics.get("run") or {}
    if not run:
        return ""
    return (f"<p>Run {html.escape(str(run.get('path')))}: models "
            f"{html.escape(', '.join(run.get('model_ids', [])))}, preset "
            f"{html.escape(str(run.get('preset')))}, {run.get('epochs')} epochs, "
            f"{run.get('n_train_atoms')} training atoms. Single-model methods use "
            f"{html.escape(str(run.get('model_id')))} and are judged against its errors"
            f"{_committee_sentence(metrics)}.</p>")


def _committee_sentence(metrics: Mapping) -> str:
    """'; X and Y are judged against the errors of the committee mean' when any is."""
    names = [n for n, kind in (metrics.get("errors_from") or {}).items()
             if kind == "committee mean"]
    if not names:
        return ""
    verb = "is" if len(names) == 1 else "are"
    return (f"; {', '.join(_name(n) for n in names)} {verb} judged against the errors of "
            "the committee mean")


def _html(metrics: Mapping, figures: list[tuple[str, str]], title: str) -> str:
    atol = metrics.get("atol")
    facts = f"{metrics.get('n_configs', '?')} configurations, {metrics.get('n_atoms', '?')} atoms"
    if atol is not None:
        source = metrics.get("atol_from")
        of = f" of {_name(source)}" if source else ""
        facts += f". atol{of} = {atol:.4g} eV/Å ({ATOL_DEFINITION})"
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
{"".join(section(metrics) for section in SECTIONS)}
<h2>Metrics per method and set</h2>
{_table(metrics)}
<p>Spearman: rank correlation of uncertainty and true error (1 = perfect ranking).
Flagged: share above the method's threshold. ECE: mean gap between predicted p and
the observed share of atoms with error &le; atol (0 = calibrated).
All numbers are in <a href="metrics.json">metrics.json</a>.</p>
{_run_section(metrics)}
<h2>Plots</h2>
{figs}
</body></html>
"""
