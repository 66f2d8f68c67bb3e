"""Task mixtures (``--task siqa+quartz``): interleaved training data, each task scored on its own
test split, and the sweep report's per-task intervals and per-item tests from real predictions."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

import pytest
import yaml

from mola.cli import main
from mola.data import datasets
from mola.data.datasets import DataError, load_examples, load_task
from mola.data.mixture import load_mixture, task_names, task_test_splits
from mola.evaluation.evaluate import mixture_metrics
from mola.training.options import TrainOptions

needs_evals = pytest.mark.skipif(
    not datasets.importlib.util.find_spec("evals"), reason="the evals package holds the tasks"
)


def test_task_names_and_errors():
    assert task_names("siqa") == ["siqa"]
    assert task_names("sarcasm+siqa+quartz+logiqa") == ["sarcasm", "siqa", "quartz", "logiqa"]
    for bad, message in (
        ("siqa+", "unknown task '(empty)'"),
        ("siqa+siqa", "names siqa twice"),
        ("siqa+medmcqa", "unknown task 'medmcqa' in 'siqa+medmcqa'"),
    ):
        with pytest.raises(DataError, match=re.escape(message)):
            task_names(bad)
        with pytest.raises(ValueError, match=r"^--task: .*" + re.escape(message)):
            TrainOptions(task=bad)
    assert TrainOptions(task="quartz+siqa").task == "quartz+siqa"


def test_logiqa_record_parsed():
    record = {
        "input": [
            {"role": "system", "content": "Instructions: choose A, B, C or D."},
            {
                "role": "user",
                "content": "\nPassage: All cats sleep. Tom is a cat.Question: What follows?\n"
                "A. A.Tom sleeps.\nB. B.Tom flies.\nC. C.Tom swims.\nD. D.Tom is a dog.\nAnswer:",
            },
        ],
        "ideal": "A",
    }
    row = datasets._parse_logiqa(record)
    assert row == (
        "What follows?",
        "All cats sleep. Tom is a cat.",
        "Tom sleeps.",
        ("Tom sleeps.", "Tom flies.", "Tom swims.", "Tom is a dog."),
    )
    assert datasets._parse_logiqa({**record, "ideal": "E"}) is None


@needs_evals
def test_mixture_splits_interleave_and_stay_per_task():
    siqa, quartz = load_task("siqa", "train"), load_task("quartz", "train")
    mixed = load_mixture("siqa+quartz", "train")
    assert len(mixed) == len(siqa) + len(quartz)
    assert [e.instruction for e in mixed[:4]] == [
        siqa[0].instruction, quartz[0].instruction, siqa[1].instruction, quartz[1].instruction
    ]  # fmt: skip
    tail = len(quartz) - len(siqa)  # quartz is longer: its last items come after siqa runs out
    assert [e.instruction for e in mixed[-tail:]] == [e.instruction for e in quartz[len(siqa) :]]
    assert load_examples("siqa+quartz", None, "train")[5].instruction == mixed[5].instruction
    tests = task_test_splits("siqa+quartz")
    assert list(tests) == ["siqa", "quartz"] and all(len(v) == 500 for v in tests.values())
    logiqa = load_task("logiqa", "test")
    assert len(logiqa) == 500 and all(len(e.choices) == 4 and e.input for e in logiqa)


def test_mixture_metrics_average_tasks():
    per_task = {
        "siqa": {"accuracy": 0.4, "macro_f1": 0.39, "n": 500},
        "quartz": {"accuracy": 0.6, "f1": 0.5, "mcc": 0.1, "n": 300},
    }
    out = mixture_metrics(per_task)
    assert out["accuracy"] == pytest.approx(0.5) and out["n"] == 800
    assert out["siqa_accuracy"] == 0.4 and out["quartz_mcc"] == 0.1 and out["siqa_n"] == 500
    assert "macro_f1" not in out and "f1" not in out  # only the metrics every task has


@needs_evals
def test_sweep_on_a_mixture_reports_each_task(tmp_path, tiny_llama_dir, capsys):
    out = tmp_path / "out"
    sweep = tmp_path / "mix.yaml"
    base = {
        "model": str(tiny_llama_dir),
        "task": "siqa+quartz",
        "template": "qa",
        "train_limit": 8,
        "eval_limit": 6,
        "max_steps": 2,
        "batch_size": 4,
        "cutoff_len": 64,
        "eval_batch_size": 16,
        "save_steps": 0,
        "top_k": 1,
        "lr": 5e-2,
    }
    sweep.write_text(
        yaml.safe_dump(
            {
                "base": base,
                "grid": {"seed": [1, 2]},
                "variants": [{"name": "one", "experts": 1}, {"name": "two", "experts": 2}],
                "output": str(out),
            }
        )
    )
    assert main(["sweep", str(sweep), "--baseline", "variant=one"]) == 0
    text = capsys.readouterr().out
    run = out / "two_seed-1"
    metrics = json.loads((run / "metrics.json").read_text())["fine_tuned"]
    assert metrics["n"] == 12
    assert metrics["accuracy"] == pytest.approx(
        (metrics["siqa_accuracy"] + metrics["quartz_accuracy"]) / 2
    )
    records = [json.loads(line) for line in (run / "predictions_fine_tuned.jsonl").open()]
    assert [r["task"] for r in records] == ["siqa"] * 6 + ["quartz"] * 6
    for task in ("siqa", "quartz"):
        right = [r["correct"] for r in records if r["task"] == task]
        assert metrics[f"{task}_accuracy"] == pytest.approx(sum(right) / 6)

    header = (out / "results.csv").read_text().splitlines()[0].split(",")
    assert "siqa_accuracy_mean" in header and not any(c.startswith("siqa_n") for c in header)
    paired = json.loads((out / "results.json").read_text())["paired"]["groups"][0]
    assert paired["variant"] == "two"
    assert set(paired["items"]) == {"accuracy", "siqa_accuracy", "quartz_accuracy"}
    for metric in ("accuracy", "siqa_accuracy", "quartz_accuracy"):
        diffs = []
        for seed, test in zip(("1", "2"), paired["items"][metric]["seeds"], strict=True):
            mine = _correct(out / f"two_seed-{seed}", metric)
            base_ = _correct(out / f"one_seed-{seed}", metric)
            assert test["b"] == sum(a and not b for a, b in zip(mine, base_, strict=True))
            assert test["c"] == sum(b and not a for a, b in zip(mine, base_, strict=True))
            diffs.append(statistics.fmean(mine) - statistics.fmean(base_))
        assert paired["diffs"][metric] == pytest.approx(diffs)
    assert "| two | siqa_accuracy | 1,2 |" in text and "| two | quartz_accuracy | 1,2 |" in text


def _correct(run: Path, metric: str) -> list[bool]:
    task = metric.removesuffix("_accuracy") if metric != "accuracy" else None
    rows = [json.loads(line) for line in (run / "predictions_fine_tuned.jsonl").open()]
    return [bool(r["correct"]) for r in rows if task is None or r["task"] == task]


def test_capacity_sweep_file_loads_stage_one_first():
    from mola.sweep import load_spec

    root = Path(__file__).resolve().parents[1]
    spec = load_spec(str(root / "examples" / "sweeps" / "capacity.yaml"))
    runs = spec.runs()
    assert len(runs) == 8 * 3
    names = [r.labels["variant"] for r in runs[:8]]
    assert names[:2] == ["lora-r8", "square"]  # stage 1 leads every seed
    assert all(r.options["task"] == "sarcasm+siqa+quartz" for r in runs)
    assert all(r.output.startswith("docs/study2/runs") for r in runs)  # committed: resumable
    r42 = next(r for r in runs if r.labels["variant"] == "lora-r42")
    assert r42.options["alpha"] == pytest.approx(16 * (42 / 8) ** 0.5, abs=0.01)  # rsLoRA scale
    shapes = {
        r.labels["variant"]: r.options.get("experts") for r in runs if r.labels["seed"] == "1"
    }
    for shape in ("inverted-triangle", "triangle", "hourglass"):
        assert sum(int(n) for n in shapes[shape].split(",")) == 150 == 5 * 30  # square's budget


def test_rank_one_pilot_is_the_capacity_recipe_at_rank_one():
    from mola.sweep import load_spec
    from mola.sweep.runner import resolved_options, same_options

    root = Path(__file__).resolve().parents[1] / "examples" / "sweeps"
    main_runs = load_spec(str(root / "capacity.yaml")).runs()
    pilot = load_spec(str(root / "capacity_r1.yaml")).runs()
    assert [r.labels["variant"] for r in pilot[:2]] == ["lora-r1", "square-r1"]
    same = ("task", "template", "lr", "max_steps", "batch_size", "train_limit", "cutoff_len")
    for run in pilot:
        assert {k: run.options[k] for k in same} == {k: main_runs[0].options[k] for k in same}
        assert float(run.options["alpha"]) == 2.0 * int(run.options["r"])  # alpha / r = 2
        assert run.output.startswith("docs/study2/pilot-r1")
        if run.labels["variant"] == "lora-r8":
            # stage 1's own runs (seeds 1-3), copied: the sweep counts them done only if the
            # options match; later seeds run here with stage 1's options but their own seed
            twins = {r.labels["seed"]: r for r in main_runs if r.labels["variant"] == "lora-r8"}
            twin = twins.get(run.labels["seed"], twins["1"])
            mine = {**resolved_options(run), "seed": twin.options["seed"]}
            assert same_options(resolved_options(twin), mine)
        else:
            assert str(run.options["r"]) == "1"
    shapes = {r.labels["variant"]: r.options.get("experts") for r in pilot}
    for name in ("inverted-triangle-r1", "triangle-r1", "hourglass-r1"):
        experts = [int(e) for e in str(shapes[name]).split(",")]
        assert len(experts) == 30 and sum(experts) == 150  # square-r1's 5 x 30


@needs_evals
def test_eval_scores_each_task_of_a_mixture(tmp_path, tiny_llama_dir):
    """``mola eval --task siqa+quartz`` scores each task on its own, as training does: per task
    exactly what ``mola eval --task <that task>`` gives, and their mean."""

    def run(task: str) -> tuple[dict, list[dict]]:
        out = tmp_path / task
        args = ["eval", "--model", str(tiny_llama_dir), "--task", task, "--limit", "4"]
        assert main([*args, "--template", "qa", "--output", str(out), "--no-progress"]) == 0
        metrics = json.loads((out / "metrics.json").read_text())["metrics"]
        return metrics, [json.loads(line) for line in (out / "predictions.jsonl").open()]

    mixed, records = run("siqa+quartz")
    assert mixed["n"] == 8 and [r["task"] for r in records] == ["siqa"] * 4 + ["quartz"] * 4
    for task in ("siqa", "quartz"):
        alone, alone_records = run(task)
        assert mixed[f"{task}_accuracy"] == pytest.approx(alone["accuracy"])
        mine = [lp for r in records if r["task"] == task for lp in r["logprobs"]]
        assert mine == pytest.approx([lp for r in alone_records for lp in r["logprobs"]], abs=1e-4)
    assert mixed["accuracy"] == pytest.approx(
        (mixed["siqa_accuracy"] + mixed["quartz_accuracy"]) / 2
    )


@needs_evals
def test_analyze_takes_a_mixture_in_equal_parts():
    import argparse

    from mola.commands.analyze import _Data

    args = argparse.Namespace(task="siqa+quartz", data=None, limit=6)
    got = [e.instruction for e in _Data(args).examples()]
    siqa, quartz = load_task("siqa", "test"), load_task("quartz", "test")
    expected = [e.instruction for pair in zip(siqa[:3], quartz[:3], strict=True) for e in pair]
    assert got == expected


@pytest.mark.parametrize("tasks", [[], ["siqa", "quartz"], ["sarcasm", "siqa", "quartz"]])
def test_results_figure_has_a_panel_per_task(tasks):
    from mola.sweep.aggregate import Group
    from mola.sweep.report import results_figure

    groups = []
    for name, shift in (("lora", 0.0), ("square", 0.02)):
        values = {"accuracy": [0.5 + shift, 0.52 + shift], "train_s": [10.0, 11.0]}
        values.update({f"{t}_accuracy": [0.4 + shift, 0.45] for t in tasks})
        values.update({f"{t}_accuracy_norm": [0.4, 0.4] for t in tasks})  # not a panel
        groups.append(Group(labels={"variant": name}, runs=["r1", "r2"], values=values))
    fig = results_figure(groups, ["variant"], list(groups[0].values))
    titles = [ax.get_title() for ax in fig.axes]
    assert len(fig.axes) == 1 + len(tasks)
    assert titles == (["mean of the tasks", *tasks] if tasks else [""])
    bars = [p.get_height() for p in fig.axes[0].patches]
    assert bars == pytest.approx([0.51, 0.53])  # the mean over seeds, per group


STAGE2_ARMS = ["lora-r1", "square-r1", "inverted-triangle-r1", "triangle-r1", "hourglass-r1",
               "uniform-8-r1", "lora-r8", "guilomo-r1"]  # fmt: skip
STUDY1_ARMS = ["inverted-triangle", "square", "lora-r8", "triangle", "hourglass", "lora-r42",
               "uniform-8", "guilomo"]  # fmt: skip


@pytest.mark.parametrize(
    ("names", "tasks", "slanted"),
    [
        (["lora", "square"], [], False),
        (["lora", "square"], ["sarcasm", "siqa", "quartz"], False),
        (STAGE2_ARMS, ["sarcasm", "siqa", "quartz"], True),  # five narrow panels: they overlapped
        (STAGE2_ARMS, [], False),  # one panel, wide enough for them
        (STUDY1_ARMS * 2, [], False),  # the first study's 16 bars, which fit
    ],
)
def test_results_figure_slants_crowded_labels(names, tasks, slanted):
    from mola.sweep.aggregate import Group
    from mola.sweep.report import results_figure

    values = {"accuracy": [0.5], **{f"{t}_accuracy": [0.5] for t in tasks}}
    groups = [Group(labels={"variant": n}, runs=["r1"], values=values) for n in names]
    fig = results_figure(groups, ["variant"], list(values))
    assert len(fig.axes) == 1 + len(tasks)
    rotations = {t.get_rotation() for t in fig.axes[0].get_xticklabels()}
    assert rotations == ({35.0} if slanted else {0.0})
