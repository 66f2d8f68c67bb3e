"""``mola sweep SWEEP.yaml [--report]``: train a grid of runs, resumably; tabulate the results."""

from __future__ import annotations

import argparse
import json

from mola.sweep import load_spec, run_state, run_sweep, write_report
from mola.sweep.aggregate import Group, groups_from_results
from mola.sweep.report import baseline_of
from mola.sweep.runner import RunState
from mola.sweep.spec import Run

HELP = "train a grid of runs from a sweep file (resumable) and tabulate mean/std over seeds"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sweep", help="sweep file (YAML: base, grid, variants, output)")
    parser.add_argument(
        "--report",
        action="store_true",
        help="train nothing: write and print the results of the runs finished so far",
    )
    parser.add_argument(
        "--list",
        action="store_true",
        help="train nothing: list the runs, their status, total experts and trainable params",
    )
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="train only the runs whose label KEY (variant or a grid key) is one of the values; "
        "repeatable (all must hold). The report still covers every run",
    )
    parser.add_argument(
        "--baseline",
        metavar="KEY=VALUE",
        help="also report each group's per-seed differences from the group with KEY=VALUE and "
        "the same other labels (e.g. variant=square): mean, 95%% t-interval over seeds, seeds "
        "above it, and McNemar / paired bootstrap over test items where runs wrote predictions",
    )
    parser.add_argument(
        "--from-results",
        metavar="RESULTS_JSON",
        help="with --report: take each run's numbers from a results.json written earlier (e.g. a "
        "committed study's) instead of the run dirs; no per-item comparison",
    )


def select(runs: list[Run], only: list[str]) -> list[Run]:
    """The runs matching every ``KEY=V1,V2`` filter."""
    chosen = runs
    for item in only:
        key, sep, values = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--only: expected KEY=V1,V2, got {item!r}")
        key = key.strip().replace("-", "_")
        if not any(key in r.labels for r in runs):
            keys = sorted({k for r in runs for k in r.labels})
            raise ValueError(f"--only: unknown key {key!r}; the runs have {', '.join(keys)}")
        wanted = {v.strip() for v in values.split(",")}
        chosen = [r for r in chosen if r.labels.get(key) in wanted]
    if not chosen:
        raise ValueError(f"--only: no run matches {' '.join(only)}")
    return chosen


def from_results(path: str, runs: list[Run]) -> tuple[dict[str, RunState], list[Group]]:
    """The runs' states (as the file lists them) and the groups of a ``results.json``."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"--from-results: cannot read {path} ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"--from-results: {path} is not a mola sweep results.json")
    try:
        groups = groups_from_results(data)
    except ValueError as err:
        raise ValueError(f"--from-results: {path}: {err}") from None
    listed = {r.get("name"): r for r in data.get("runs") or [] if isinstance(r, dict)}
    states = {
        r.name: RunState(
            str(listed.get(r.name, {}).get("status", "pending")),
            error=listed.get(r.name, {}).get("error"),
        )
        for r in runs
    }
    return states, groups


def run(args: argparse.Namespace) -> int:
    spec = load_spec(args.sweep)
    runs = spec.runs()
    if args.list:
        from mola.sweep.plan import run_size

        for index, item in enumerate(runs, 1):
            try:
                experts, params = run_size(item)
                size = f"{experts} experts, {params:,d} trainable params"
            except (ValueError, OSError) as err:  # e.g. an allocation file still to be written
                size = f"size unknown: {str(err).splitlines()[0]}"
            print(f"[{index}/{len(runs)}] {item.name}: {run_state(item).status} ({size})")
        return 0
    baseline = baseline_of(runs, args.baseline)
    if args.from_results:
        if not args.report:
            raise ValueError("--from-results: only with --report (it trains nothing)")
        states, groups = from_results(args.from_results, runs)
        print(write_report(spec, runs, states, baseline, groups), end="")
        print(f"results.md, results.csv, results.json and results.png in {spec.output}")
        return 0
    states = {r.name: run_state(r) for r in runs}
    if not args.report:
        states.update(run_sweep(spec, select(runs, args.only)))
    print(write_report(spec, runs, states, baseline), end="")
    print(f"results.md, results.csv, results.json and results.png in {spec.output}")
    failed = [r for r in runs if states[r.name].status == "failed"]
    return 1 if failed and not args.report else 0
