"""The EMT copper evaluation table of several demo runs side by side (one per backend).

Each ``--demo NAME=DIR`` is a folder written by ``mlipuq demo --backend NAME --out DIR``;
the script reads ``DIR/report/metrics.json`` and ``DIR/demo.json`` and prints, per
method and backend: ROC-AUC of every out-of-domain set against the in-domain held-out
configurations, the ECE on the in-domain held-out half (methods with a probability
``p``), and the per-atom Spearman rank correlation of uncertainty and force error over
all test atoms.

Run::

    for b in nequip allegro pace; do mlipuq demo --backend $b --out demo-$b; done
    .venv-mace/bin/mlipuq demo --backend mace --out demo-mace
    python benchmarks/backends_table.py --demo nequip=demo-nequip --demo allegro=demo-allegro \\
        --demo mace=demo-mace --demo pace=demo-pace
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

IN_DOMAIN = "bulk_300K"


def _fmt(value: object) -> str:
    return "–" if value is None else f"{float(value):.2f}"


def read_demo(folder: Path) -> tuple[dict, dict]:
    """(metrics, demo settings) of one demo folder."""
    metrics = json.loads((folder / "report" / "metrics.json").read_text())
    settings_file = folder / "demo.json"
    settings = json.loads(settings_file.read_text()) if settings_file.is_file() else {}
    return metrics, settings


def table(demos: dict[str, Path]) -> str:
    """A markdown table: one row per (method, backend)."""
    loaded = {name: read_demo(path) for name, path in demos.items()}
    ood = [s for s in next(iter(loaded.values()))[0]["test_sets"] if s != IN_DOMAIN]
    head = ["method", "backend", *(f"AUC {s}" for s in ood), "ECE", "Spearman atom"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    methods = sorted({m for metrics, _ in loaded.values() for m in metrics["methods"]})
    for method in methods:
        for name, (metrics, _) in loaded.items():
            entry = metrics["methods"].get(method)
            if entry is None:
                continue
            scores = entry["metrics"]
            cells = [_fmt(scores.get(s, {}).get("roc_auc")) for s in ood]
            cells.append(_fmt(scores.get(IN_DOMAIN, {}).get("ece")))
            cells.append(_fmt(scores.get("all", {}).get("spearman_atom")))
            rows.append("| " + " | ".join([method, name, *cells]) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", action="append", required=True, metavar="NAME=DIR",
                        help="a demo folder and the name of its column")
    args = parser.parse_args(argv)
    demos = {}
    for item in args.demo:
        name, _, path = item.partition("=")
        folder = Path(path)
        if not name or not (folder / "report" / "metrics.json").is_file():
            print(f"--demo: expected NAME=DIR with DIR/report/metrics.json, got {item!r}",
                  file=sys.stderr)
            return 2
        demos[name] = folder
    for name, folder in demos.items():
        settings = read_demo(folder)[1]
        print(f"{name}: {folder} (models {settings.get('n_models')}, epochs "
              f"{settings.get('epochs')}, preset {settings.get('preset')})")
    print()
    print(table(demos))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
