"""``mola sweep`` end to end on a tiny random model: grid, kill and rerun, failures, aggregation."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mola.cli import main
from mola.sweep import load_spec, run_state
from mola.sweep.spec import Run
from mola.training.options import TrainOptions

ROWS = [
    {"question": "Is the sky blue on a clear day?", "choices": ["yes", "no"], "answer": "yes"},
    {"question": "Is a brick lighter than a feather?", "choices": ["yes", "no"], "answer": "no"},
    {"question": "What color is the sky?", "choices": ["blue", "green", "red"], "answer": "blue"},
] * 2


def base_config(model_dir: Path, data: Path) -> dict:
    return {
        "model": str(model_dir),
        "data": str(data),
        "eval_data": str(data),
        "max_steps": 2,
        "batch_size": 3,
        "logging_steps": 1,
        "eval_batch_size": 8,
        "save_steps": 1,
        "top_k": 1,
    }


def write_sweep(path: Path, **spec) -> Path:
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sweep-data") / "mc.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    return path


def finished(runs: list[Run]) -> list[Run]:
    return [r for r in runs if run_state(r).status == "done"]


def test_grid_kill_rerun_failure_and_aggregation(tmp_path, tiny_llama_dir, data, capsys):
    out = tmp_path / "sweep"
    sweep = write_sweep(
        tmp_path / "grid.yaml",
        base=base_config(tiny_llama_dir, data),
        grid={"experts": [1, 2], "r": [2, 4], "seed": [1, 2]},
        # sets a grid key, so the grid's own points are arms too; fails: 3 groups for 2 layers
        variants=[{"name": "broken", "experts": "2,3,4", "r": 2}],
        output=str(out),
    )
    spec = load_spec(str(sweep))
    runs = spec.runs()
    names = [r.name for r in runs]
    assert len(runs) == 10
    assert names[:3] == ["experts-1_r-2_seed-1", "broken_seed-1", "experts-1_r-2_seed-2"]
    assert runs[1].labels == {"variant": "broken", "experts": "2,3,4", "r": "2", "seed": "1"}

    # a first sweep in another process, killed once two runs have finished
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mola.cli", "sweep", str(sweep)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 600
        while len(finished(runs)) < 2 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    before = {r.name: os.stat(Path(r.output) / "metrics.json").st_mtime_ns for r in finished(runs)}
    assert 2 <= len(before) < 8

    # the rerun skips what finished, trains the rest, records the failures and goes on
    code = main(["sweep", str(sweep)])
    text = capsys.readouterr().out
    assert code == 1  # some runs failed
    for name in before:
        assert os.stat(out / name / "metrics.json").st_mtime_ns == before[name]
    skipped = [line for line in text.splitlines() if "finished, skipped" in line]
    assert len(skipped) == len(before)
    assert "[10/10]" in text and "runs left, ETA" in text
    assert "ETA ~" in text.splitlines()[0]  # estimated from the runs finished before the kill
    grid_runs = [r for r in runs if "variant" not in r.labels]
    assert [r.name for r in finished(runs)] == [r.name for r in grid_runs]
    for run in grid_runs:  # finished runs keep their adapter, not their checkpoints
        assert (Path(run.output) / "adapter_model.safetensors").is_file()
        assert not any(p.name.startswith("checkpoint-") for p in Path(run.output).iterdir())
    for run in runs:
        if "variant" in run.labels:
            error = json.loads((Path(run.output) / "error.json").read_text())
            assert "3 values for 2 decoder layers" in error["error"]
            assert "FAILED" in text and run_state(run).status == "failed"

    # aggregation: recompute the table from the runs' own metrics.json files
    with open(out / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0])[:3] == ["variant", "experts", "r"]
    assert "n" in rows[0] and "accuracy_mean" in rows[0] and "train_s_std" in rows[0]
    assert len(rows) == 4  # the broken variant has no finished run
    report = json.loads((out / "results.json").read_text())
    for row, group in zip(rows, report["groups"], strict=True):
        members = [
            r
            for r in grid_runs
            if (r.labels["experts"], r.labels["r"]) == (row["experts"], row["r"])
        ]
        metrics = [json.loads((Path(r.output) / "metrics.json").read_text()) for r in members]
        acc = [m["fine_tuned"]["accuracy"] for m in metrics]
        times = [m["timings"]["train_s"] for m in metrics]
        assert int(row["n"]) == 2 == group["n"]
        assert float(row["accuracy_mean"]) == pytest.approx(statistics.fmean(acc))
        assert float(row["accuracy_std"]) == pytest.approx(statistics.stdev(acc))
        assert float(row["train_s_mean"]) == pytest.approx(statistics.fmean(times))
        assert float(row["train_s_std"]) == pytest.approx(statistics.stdev(times))
        assert int(row["trainable_params"]) == metrics[0]["trainable_params"]
        assert int(row["total_experts"]) == 2 * int(row["experts"])  # two decoder layers
        assert group["seeds"] == ["1", "2"]
    assert int(rows[0]["trainable_params"]) < int(rows[1]["trainable_params"])  # r 2 < r 4
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "results.md").read_text()
    assert "Failed runs:" in md and "broken_seed-1" in md and "8 of 10 runs finished" in md

    # --report trains nothing and writes the same table
    assert main(["sweep", str(sweep), "--report"]) == 0
    assert (out / "results.md").read_text() == md


def test_resume_stale_and_only(tmp_path, tiny_llama_dir, data, capsys):
    out = tmp_path / "sweep"
    spec = {
        "base": {**base_config(tiny_llama_dir, data), "experts": 2},
        "grid": {"seed": [1]},
        "variants": [{"name": "a", "r": 2}, {"name": "b", "r": 4}],
        "output": str(out),
        "keep_checkpoints": True,
    }
    sweep = write_sweep(tmp_path / "s.yaml", **spec)
    assert main(["sweep", str(sweep), "--only", "variant=a"]) == 0
    text = capsys.readouterr().out
    assert "[1/1] variant=a seed=1:" in text and "b_seed-1" not in text.split("Sweep")[0]
    assert "`b_seed-1` (pending)" in text  # the report lists what is left

    # interrupted after its first checkpoint: no metrics.json, no last checkpoint -> resumed
    run = out / "a_seed-1"
    (run / "metrics.json").unlink()
    shutil.rmtree(run / "checkpoint-2")
    assert main(["sweep", str(sweep), "--only", "variant=a"]) == 0
    assert "resumed" in capsys.readouterr().out
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["resumed_from"].endswith("checkpoint-1")
    assert main(["sweep", str(sweep), "--list"]) == 0  # sizes from a meta-device model
    experts = sum(metrics["allocation"]["num_experts"])
    trainable = metrics["trainable_params"]
    assert f"a_seed-1: done ({experts} experts, {trainable:,d} trainable params)" in (
        capsys.readouterr().out
    )

    # the sweep file changed: the finished run no longer matches and is trained again
    spec["base"]["lr"] = 1e-3
    write_sweep(sweep, **spec)
    assert main(["sweep", str(sweep), "--list"]) == 0
    assert "a_seed-1: stale (" in capsys.readouterr().out
    assert main(["sweep", str(sweep), "--only", "variant=a"]) == 0
    assert "skipped" not in capsys.readouterr().out
    assert json.loads((run / "metrics.json").read_text())["options"]["lr"] == 1e-3


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"grid": {"experts": [2]}, "bogus": 1}, "unknown key 'bogus'"),
        ({"base": {"learning_rate": 1}}, "unknown option 'learning_rate'"),
        ({"base": {"output": "x"}}, "set by the sweep"),
        ({"grid": {"lr": [-1.0]}}, "--lr: must be a finite number > 0"),
        ({"grid": {"max_steps": ["many"]}}, "max_steps: expected int"),
        ({"variants": [{"experts": 2}]}, "must be a mapping with a 'name'"),
        ({"variants": [{"name": "a"}, {"name": "a"}]}, "two variants are named 'a'"),
        ({"grid": {"seed": [1]}, "grid_arms": "no"}, "grid_arms must be true or false"),
        ({"base": {"allocation": "a_{tsak}.yaml"}}, "{tsak} names no mola train option"),
        ({"base": {"data": "{data}.jsonl"}}, "data: {data} refers to itself"),
        ({"base": {"allocation": "{eval_data}.yaml"}}, "{eval_data} is not set for this run"),
    ],
)
def test_bad_sweep_files(tmp_path, capsys, spec, message):
    sweep = write_sweep(tmp_path / "bad.yaml", **spec)
    assert main(["sweep", str(sweep)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "grid_arms, expected",
    [
        # inferred: the variant sets `task`, a grid key, so the grid's own points are arms too
        (None, ["task-siqa", "a_task-siqa", "pinned", "task-quartz", "a_task-quartz"]),
        (False, ["a_task-siqa", "pinned", "a_task-quartz"]),
        (True, ["task-siqa", "a_task-siqa", "pinned", "task-quartz", "a_task-quartz"]),
    ],
)
def test_grid_arms_explicit(tmp_path, grid_arms, expected):
    spec = {
        "grid": {"task": ["siqa", "quartz"]},
        "variants": [{"name": "a", "experts": 2}, {"name": "pinned", "task": "siqa", "lr": 1e-3}],
    }
    if grid_arms is not None:
        spec["grid_arms"] = grid_arms
    runs = load_spec(str(write_sweep(tmp_path / "s.yaml", **spec))).runs()
    assert [r.name for r in runs] == expected
    pinned = next(r for r in runs if r.name == "pinned")
    assert pinned.options["task"] == "siqa" and pinned.options["lr"] == 1e-3


def test_placeholders_filled_per_run(tmp_path):
    spec = {
        "base": {"router": "topk", "method": "{{literal}}"},
        "grid": {"task": ["siqa", "quartz"], "seed": [1, 2]},
        "variants": [
            {"name": "alloc", "allocation": "allocations/guilomo_{task}_s{seed}_{router}.yaml"},
            {"name": "plain", "experts": 3},
        ],
    }
    runs = load_spec(str(write_sweep(tmp_path / "s.yaml", **spec))).runs()
    got = {
        (r.labels["task"], r.labels["seed"]): r.options["allocation"]
        for r in runs
        if r.labels["variant"] == "alloc"
    }
    assert got == {
        (t, str(s)): f"allocations/guilomo_{t}_s{s}_topk.yaml"
        for t in ("siqa", "quartz")
        for s in (1, 2)
    }
    assert all(r.options["method"] == "{literal}" for r in runs)  # {{ }} are literal braces
    assert all(r.options.get("allocation") is None for r in runs if r.labels["variant"] == "plain")


def test_paired_differences_against_a_baseline(tmp_path, capsys):
    from mola.sweep import write_report
    from mola.sweep.runner import RunState

    sweep = write_sweep(
        tmp_path / "p.yaml",
        grid={"task": ["siqa", "quartz"], "seed": [1, 2, 3]},
        variants=[{"name": "square", "experts": 5}, {"name": "tri", "experts": 3}],
        output=str(tmp_path / "out"),
    )
    spec = load_spec(str(sweep))
    runs = spec.runs()
    acc = {  # (variant, task, seed) -> accuracy; quartz square seed 3 never finished
        ("square", "siqa", 1): 0.40, ("square", "siqa", 2): 0.44, ("square", "siqa", 3): 0.42,
        ("tri", "siqa", 1): 0.43, ("tri", "siqa", 2): 0.43, ("tri", "siqa", 3): 0.46,
        ("square", "quartz", 1): 0.55, ("square", "quartz", 2): 0.50,
        ("tri", "quartz", 1): 0.52, ("tri", "quartz", 2): 0.56, ("tri", "quartz", 3): 0.60,
    }  # fmt: skip
    states = {}
    for r in runs:
        key = (r.labels["variant"], r.labels["task"], int(r.labels["seed"]))
        if key in acc:
            states[r.name] = RunState("done", {"fine_tuned": {"accuracy": acc[key], "n": 500}})
        else:
            states[r.name] = RunState("pending")
    text = write_report(spec, runs, states, ("variant", "square"))
    data = json.loads((tmp_path / "out" / "results.json").read_text())["paired"]
    assert data["baseline"] == {"variant": "square"}
    rows = {g["task"]: g for g in data["groups"]}
    assert set(rows) == {"siqa", "quartz"} and all(g["variant"] == "tri" for g in rows.values())
    for task, seeds in (("siqa", [1, 2, 3]), ("quartz", [1, 2])):  # paired on common seeds only
        want = [acc[("tri", task, s)] - acc[("square", task, s)] for s in seeds]
        row = rows[task]
        assert row["seeds"] == [str(s) for s in seeds]
        assert row["diffs"]["accuracy"] == pytest.approx(want)
        assert row["accuracy_diff_mean"] == pytest.approx(statistics.fmean(want))
        assert row["accuracy_diff_std"] == pytest.approx(statistics.stdev(want))
        assert row["accuracy_above"] == sum(d > 0 for d in want)
    assert "| tri | siqa | 1,2,3 | +2.00 [-4.57, +8.57] | +3.00, -1.00, +4.00 | 2 of 3 |" in text
    assert "| tri | quartz | 1,2 | +1.50 [-55.68, +58.68] | -3.00, +6.00 | 1 of 2 |" in text
    # without a baseline the report has no paired section
    assert "Paired" not in write_report(spec, runs, states)

    for bad, message in (
        ("variant", "expected KEY=VALUE"),
        ("seed=1", "unknown key 'seed'; the groups differ by variant, task"),
        ("variant=sqare", "no run has variant=sqare; variant is one of square, tri"),
    ):
        assert main(["sweep", str(sweep), "--report", "--baseline", bad]) == 2
        assert message in capsys.readouterr().err
    assert main(["sweep", str(sweep), "--report", "--baseline", "variant=square"]) == 0
    assert "(no pairs finished yet)" in capsys.readouterr().out


def test_a_template_chosen_at_run_time_matches_the_recorded_one():
    from mola.sweep.runner import same_options

    resolved = TrainOptions(task="siqa").to_dict()  # template unset: chosen from the data
    assert resolved["template"] is None
    assert same_options({**resolved, "template": "alpaca"}, resolved)
    explicit = TrainOptions(task="siqa", template="qa").to_dict()
    assert not same_options({**explicit, "template": "alpaca"}, explicit)
