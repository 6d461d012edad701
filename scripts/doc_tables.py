"""Tables of measured numbers in README.md and docs/*.md, generated from files, never typed.

A page marks a table's place with two lines::

    <!-- generated: NAME -->
    <!-- end generated -->

and this script writes the table between them:

- ``monitor_settings``: every monitor setting and its comment, from ``configs/curvature/base.yaml``;
- any other ``NAME``: from ``docs/data/NAME.json``, a benchmark's JSON committed with the docs
  (``benchmarks/results/`` is not committed). Each table ends with the machine, the date and the
  command that measured it. Without the JSON the table's place says how to measure it.

Usage::

    python scripts/doc_tables.py --import benchmarks/results/monitor_overhead.json  # copy, stamped
    python scripts/doc_tables.py --write     # fill every marked place
    python scripts/doc_tables.py --check     # exit 1 if a page is stale (as tests/test_docs.py)

``--import`` copies a benchmark's JSON to ``docs/data/`` and adds ``recorded`` (the file's
modification time and this machine's name, processor and CPU count) unless the JSON has its own
``environment.date``; import on the machine that ran the benchmark.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "docs" / "data"
PAGES = ("README.md", *(f"docs/{p.name}" for p in sorted((ROOT / "docs").glob("*.md"))))
MARK = re.compile(r"(<!-- generated: (\S+) -->\n)(.*?)(<!-- end generated -->)", re.S)


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _table(header: list[str], rows: list[list[str]], align: str) -> str:
    """A Markdown table; ``align`` has one letter per column (l or r)."""
    rule = ["---" if a == "l" else "--:" for a in align]
    return "\n".join([_row(header), _row(rule), *(_row(r) for r in rows)])


def _provenance(data: dict[str, Any], command: str) -> str:
    env = data.get("environment") or {}
    rec = data.get("recorded") or {}
    date = env.get("date") or rec.get("date") or "unknown date"
    machine = env.get("machine") or rec.get("machine") or "unknown machine"
    cpus = env.get("cpus") or rec.get("cpus")
    torch = env.get("torch") or data.get("torch")
    parts = [f"machine `{machine}`"]
    if cpus:
        parts.append(f"{cpus} CPUs")
    if torch:
        parts.append(f"torch {torch}")
    if env.get("threads"):
        parts.append(f"{env['threads']} thread(s)")
    if env.get("loadavg_before"):
        parts.append(f"load average {env['loadavg_before'][0]:.1f} at the start")
    return f"Measured {date[:10]} on {', '.join(parts)}, by `{command}`."


def _args(settings: dict[str, Any], skip: tuple[str, ...] = ()) -> str:
    flags = []
    for key, value in settings.items():
        if key in skip or value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        flags.append(flag if value is True else f"{flag} {value}")
    return " ".join(flags)


# ---------------------------------------------------------------------------------------------
# renderers: one per NAME


def monitor_settings() -> str:
    """Each key of configs/curvature/base.yaml with the comment written beside it."""
    rows = []
    for line in (ROOT / "configs" / "curvature" / "base.yaml").read_text().splitlines():
        match = re.match(r"^(\w+):\s*(\S*)\s*#\s*(.*)$", line)
        if match:
            key, value, comment = match.groups()
            comment = comment.replace("|", "\\|")
            rows.append([f"`{key}`", f"`{value}`" if value != "null" else "", comment])
    return _table(["setting", "value in base.yaml", "what it does"], rows, "lll")


def monitor_overhead(data: dict[str, Any]) -> str:
    s = data["settings"]
    rows = []
    for b in data["backends"]:
        hvps = "/".join(
            str(round(statistics.median(b["per_quantity"][q]["n_hvp"])))
            if b["per_quantity"].get(q, {}).get("n_hvp")
            else "—"
            for q in ("trace", "eigenvalues")
        )
        rows.append(
            [
                f"`{b['backend']}`",
                hvps,
                str(b["measurements_per_run"]),
                f"{b['cpu_seconds_per_measurement']:.2f}",
                f"{b['cpu_cost_in_training_steps']:.1f}",
                f"{b['cpu_overhead_at_500']:.1%}",
                "; ".join(e[:80] for e in b["errors"]) or "",
            ]
        )
    skipped = []
    for name, reason in data["skipped"].items():
        rows.append([f"`{name}`", "", "", "", "", "", "not measured, below"])
        skipped.append(f"- `{name}`: {reason.split('; ')[0]}.")
    header = [
        "backend",
        "HVPs trace/λ_max",
        "measurements per run",
        "CPU s per measurement",
        "in training steps",
        "share at every 500 steps",
        "note",
    ]
    model = s["model"] + (f" at width {s['width']:g}" if s["model"] == "resnet18_cifar" else "")
    caption = (
        f"{model}, training batch {s['batch']}, curvature batch {s['hessian_batch_size']}, "
        f"{s['num_samples']} trace products, {s['steps']} steps measured every {s['every']}, "
        f"{s['rounds']} interleaved round(s). `hutchpp` measures both quantities in one call, so "
        "its λ_max count includes the trace's products. Shares are CPU time against training "
        "steps of the same run with the monitor off."
    )
    command = "python benchmarks/monitor_overhead.py " + _args(
        {k: s[k] for k in ("steps", "every", "rounds", "threads", "quick") if k in s}
    )
    parts = [_table(header, rows, "lrrrrrl"), *(["\n".join(skipped)] if skipped else [])]
    return "\n\n".join([*parts, caption, _provenance(data, command)])


def data_noise(data: dict[str, Any]) -> str:
    rows = [
        [
            f"`{r['backend']}`",
            str(r["batch_size"]),
            str(r["draws"]),
            f"{r['coverage_data']:.1%}",
            f"{r['coverage_probe']:.1%}",
            f"{r['mean_stderr']:.3g}",
            f"{r['sd_of_values']:.3g}",
        ]
        for r in data["rows"]
    ]
    header = [
        "backend",
        "batch",
        "draws",
        "covers, probe + data interval",
        "covers, probe-only interval",
        "mean stderr",
        "sd of the values",
    ]
    caption = (
        f"Coverage of the exact full-data trace ({data['exact_trace']:.4g}, "
        f"{data['population']} samples) by the 95 % interval; {data['probes']} products, "
        f"{data['groups']} data groups per draw."
    )
    draws = data["rows"][0]["draws"] if data["rows"] else 0
    command = f"python benchmarks/data_noise.py --draws {draws}"
    return "\n\n".join([_table(header, rows, "lrrrrrr"), caption, _provenance(data, command)])


def hvp_cost(data: dict[str, Any]) -> str:
    rows = []
    for name, r in data["models"].items():
        rows.append(
            [
                name,
                str(r["dim"]),
                f"{r['graph_ratio']:.2f}",
                *(f"{r['hvp_ratio'][pb]:.2f}" for pb in ("1", "8")),
                *(f"{r['estimate_ratio'][pb]:.2f}" for pb in ("1", "8")),
            ]
        )
    header = [
        "model",
        "parameters",
        "graph build",
        "HVP, 1 per call",
        "HVP, 8 per call",
        "estimate(), 1 per call",
        "estimate(), 8 per call",
    ]
    caption = (
        "CPU seconds per product divided by CPU seconds per gradient (forward + backward); "
        "`cnn`: the tests' tiny float64 CNN on 12 samples, `resnet`: a small CIFAR ResNet with "
        f"BatchNorm on {data['settings']['batch']} images; the graph is built once per batch."
    )
    command = "python benchmarks/hvp_cost.py " + _args(data["settings"])
    return "\n\n".join([_table(header, rows, "lrrrrrr"), caption, _provenance(data, command)])


RENDERERS: dict[str, Callable[[dict[str, Any]], str]] = {
    "monitor_overhead": monitor_overhead,
    "data_noise": data_noise,
    "hvp_cost": hvp_cost,
}


def render(name: str) -> str:
    """The Markdown that belongs between the markers of ``name``."""
    if name == "monitor_settings":
        return monitor_settings()
    path = DATA / f"{name}.json"
    if not path.is_file():
        return (
            f"*Not measured in this checkout:* run `python benchmarks/{name}.py`, then "
            f"`python scripts/doc_tables.py --import benchmarks/results/{name}.json --write`."
        )
    if name not in RENDERERS:
        raise SystemExit(f"doc_tables: {path} has no renderer; add one to {__file__}")
    return RENDERERS[name](json.loads(path.read_text()))


def generate(text: str) -> str:
    """``text`` with every marked table regenerated."""
    return MARK.sub(lambda m: m.group(1) + render(m.group(2)) + "\n" + m.group(4), text)


def import_json(source: Path) -> Path:
    data = json.loads(source.read_text())
    if not (data.get("environment") or {}).get("date"):
        mtime = datetime.datetime.fromtimestamp(source.stat().st_mtime, datetime.UTC)
        data["recorded"] = {
            "date": mtime.isoformat(timespec="seconds"),
            "machine": platform.node(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
        }
    DATA.mkdir(parents=True, exist_ok=True)
    target = DATA / source.name
    target.write_text(json.dumps(data, indent=1) + "\n")
    return target


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--import", dest="imports", type=Path, nargs="*", default=[])
    parser.add_argument("--write", action="store_true", help="rewrite the pages")
    parser.add_argument("--check", action="store_true", help="exit 1 when a page is stale")
    args = parser.parse_args()
    for source in args.imports:
        print(f"imported {import_json(source).relative_to(ROOT)}")
    stale = []
    for page in PAGES:
        path = ROOT / page
        text = path.read_text(encoding="utf-8")
        new = generate(text)
        if new != text:
            stale.append(page)
            if args.write:
                path.write_text(new, encoding="utf-8")
    verb = "rewrote" if args.write else "stale"
    for page in stale:
        print(f"{verb}: {page}")
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
