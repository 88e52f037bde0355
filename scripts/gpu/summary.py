"""The GPU check's summary: figures, steps, failures (markdown on stdout, results.json).

Reads what scripts/gpu_check.sh left in ``OUTDIR/logs``: ``steps.tsv`` and the JSON of
direct_bench.py and fabric_check.py. Writes ``OUTDIR/results.json`` (all of it, raw) and
prints markdown for ``OUTDIR/summary.md``::

    python summary.py OUTDIR --budget 470 --elapsed 455
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

TARGET = 0.95
"""The fabric's tokens/s against the library's own generator, at least."""


def load(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def rate(value: float | None) -> str:
    return "–" if value is None else f"{value:,.0f}"


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def percent(value: float | None) -> str:
    return "–" if value is None else f"{value:.1%}"


def gpu_name() -> str:
    if shutil.which("nvidia-smi") is None:
        return "no GPU"
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip()
        return out.splitlines()[0] if out else "no GPU"
    except (subprocess.SubprocessError, OSError):
        return "no GPU"


def engine_row(kind: str, direct: dict | None, fabric: dict | None) -> tuple[list[str], dict[str, Any]]:
    lib = (direct or {}).get("library") or {}
    back = (direct or {}).get("backend") or {}
    fab = fabric or {}
    figures = {
        "library_tps": (lib.get("single") or {}).get("decode_tps"),
        "backend_tps": (back.get("single") or {}).get("decode_tps"),
        "fabric_tps": (fab.get("single") or {}).get("decode_tps"),
        "library_aggregate_tps": (lib.get("concurrent") or {}).get("aggregate_tps"),
        "fabric_aggregate_tps": (fab.get("concurrent") or {}).get("aggregate_tps"),
    }
    figures["fabric_ratio"] = ratio(figures["fabric_tps"], figures["library_tps"])
    figures["fabric_aggregate_ratio"] = ratio(figures["fabric_aggregate_tps"], figures["library_aggregate_tps"])
    cancel = fab.get("cancel") or {}
    held, loaded, unloaded = fab.get("memory_bytes"), fab.get("vram_loaded_mib"), fab.get("vram_unloaded_mib")
    vram = "–"
    if held and loaded is not None and unloaded is not None:
        vram = f"{held / 2**20:,.0f} MiB held, {loaded - unloaded:,} MiB freed"
    idle = cancel.get("idle_after_s")
    row = [
        kind,
        rate(figures["library_tps"]),
        rate(figures["backend_tps"]),
        rate(figures["fabric_tps"]),
        percent(figures["fabric_ratio"]),
        f"{rate(figures['library_aggregate_tps'])} / {rate(figures['fabric_aggregate_tps'])}",
        "–" if idle is None else f"{idle * 1e3:.0f} ms",
        vram,
    ]
    return row, figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--budget", type=int, default=0)
    parser.add_argument("--elapsed", type=int, default=0)
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    logs = args.out / "logs"
    steps = []
    for line in (logs / "steps.tsv").read_text().splitlines() if (logs / "steps.tsv").is_file() else []:
        name, status, seconds, note = (line.split("\t") + ["", "", "", ""])[:4]
        steps.append({"step": name, "status": status, "seconds": int(seconds or 0), "note": note})
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "gpu": gpu_name(),
                               "dry_run": args.dry_run, "elapsed_s": args.elapsed, "budget_s": args.budget,
                               "steps": steps, "engines": {}}
    lines = [f"# helexa GPU check, {results['date']}", "",
             f"{'Dry run (no CUDA steps)' if args.dry_run else results['gpu']}; {args.elapsed} s of a {args.budget} s budget.", "",
             "## Figures", "",
             "Decode tokens/s of one stream (median of the rounds); aggregate tokens/s of concurrent streams; "
             f"target: the fabric at least {TARGET:.0%} of the library's own generator.", "",
             "| engine | library | helexa backend | through the fabric | fabric / library | aggregate library / fabric "
             "| cancel: neuron idle after | VRAM on unload |",
             "|---|---|---|---|---|---|---|---|"]
    verdicts = []
    for kind in ("exllamav2", "exllamav3", "synthetic"):
        direct, fabric = load(logs / f"direct-{kind}.json"), load(logs / f"fabric-{kind}.json")
        if direct is None and fabric is None:
            continue
        row, figures = engine_row(kind, direct, fabric)
        results["engines"][kind] = {"figures": figures, "direct": direct, "fabric": fabric}
        lines.append("| " + " | ".join(row) + " |")
        if figures["fabric_ratio"] is not None:
            verdicts.append(f"{kind}: fabric {figures['fabric_ratio']:.1%} of the library "
                            f"({'meets' if figures['fabric_ratio'] >= TARGET else 'BELOW'} the {TARGET:.0%} target)")
        for failure in (direct or {}).get("failures", []) + (fabric or {}).get("failures", []):
            verdicts.append(f"{kind}: FAILED check: {failure}")
    if not results["engines"]:
        lines.append("| (no figures: the measuring steps did not run) | | | | | | | |")
    lines += [""] + [f"- {v}" for v in verdicts] + ["", "## Steps", "", "| step | status | seconds | note |", "|---|---|---|---|"]
    lines += [f"| {s['step']} | {s['status']} | {s['seconds']} | {s['note']} |" for s in steps]
    failed = [s for s in steps if s["status"] == "failed"]
    if failed:
        lines += ["", "## Failed steps (last lines of each log)"]
        for s in failed:
            log = next(iter(sorted(logs.glob(f"*-{s['step']}.log"))), None)
            tail = log.read_text(errors="replace").splitlines()[-25:] if log else []
            lines += ["", f"### {s['step']}: {s['note']}", "", "```", *tail, "```"]
    (args.out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
