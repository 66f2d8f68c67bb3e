"""What the sweep report can resolve: t quantiles and intervals, McNemar, the paired bootstrap,
per-item comparisons from real predictions, and a report rebuilt from a results.json."""

from __future__ import annotations

import json
import math
import statistics
from fractions import Fraction
from pathlib import Path

import pytest
import yaml

from mola.cli import main
from mola.sweep import load_spec, write_report
from mola.sweep.aggregate import (
    Paired,
    group_runs,
    groups_from_results,
    one_pass_loss,
    paired_differences,
)
from mola.sweep.items import PREDICTIONS, item_tests
from mola.sweep.runner import RunState, run_state
from mola.sweep.stats import (
    mcnemar_exact,
    no_spread,
    paired_bootstrap,
    t_interval,
    t_quantile,
    t_test_p,
)

# two-sided 95% critical values of Student's t, as printed in the usual tables (3 decimals)
T_TABLE = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 9: 2.262, 29: 2.045, 120: 1.980}


@pytest.mark.parametrize("df, value", sorted(T_TABLE.items()))
def test_t_quantile_matches_the_table(df, value):
    assert t_quantile(0.975, df) == pytest.approx(value, abs=5e-4)
    assert t_quantile(0.025, df) == pytest.approx(-value, abs=5e-4)


def test_t_quantile_closed_forms_and_normal_limit():
    for p in (0.6, 0.9, 0.975, 0.995):
        assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-9)
        # df = 2: F^-1(p) = (2p - 1) / sqrt(2 p (1 - p))
        assert t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-9)
    assert t_quantile(0.975, 1e6) == pytest.approx(statistics.NormalDist().inv_cdf(0.975), 1e-5)
    for bad in (0.0, 1.0):
        with pytest.raises(ValueError, match="p must be in"):
            t_quantile(bad, 3)
    with pytest.raises(ValueError, match="degrees of freedom"):
        t_quantile(0.9, 0)


def test_t_interval_by_hand():
    # inverted-triangle minus square on siqa, per seed (docs/study/results.json): +1.0, -0.4, 0
    diffs = [0.010, -0.004, 0.000]
    mean = (0.010 - 0.004 + 0.0) / 3
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2)
    half = 4.303 * sd / math.sqrt(3)
    low, high = t_interval(diffs)
    assert low == pytest.approx(mean - half, abs=1e-5) and high == pytest.approx(mean + half, 1e-4)
    assert (round(100 * low, 1), round(100 * high, 1)) == (-1.6, 2.0)  # the issue's [-1.6, +2.0]
    five = [0.3, 0.1, -0.2, 0.4, 0.0]
    m5 = sum(five) / 5
    sd5 = math.sqrt(sum((d - m5) ** 2 for d in five) / 4)
    assert t_interval(five) == pytest.approx(
        (m5 - 2.776 * sd5 / 5**0.5, m5 + 2.776 * sd5 / 5**0.5), abs=1e-4
    )
    assert t_interval([0.5]) is None and t_interval([]) is None


def test_t_test_p_by_hand():
    # df = 2: two-sided p = 1 - |t| / sqrt(2 + t^2)
    diffs = [-0.026, -0.006, -0.016]  # lora-r42 minus square on quartz
    mean = sum(diffs) / 3
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2)
    t = mean / (sd / math.sqrt(3))
    assert t_test_p(diffs) == pytest.approx(1 - abs(t) / math.sqrt(2 + t * t), rel=1e-9)
    assert round(t_test_p(diffs), 2) == 0.11
    assert t_test_p([1.0]) is None


@pytest.mark.parametrize(
    "diffs",
    [
        [0.0, 0.0],
        [0.1, 0.1],
        # the rank-1 pilot's sarcasm row: two seeds, each +1.2 points, unequal in the last bits
        [0.668 - 0.656, 0.698 - 0.686],
        [-0.002, -0.002, -0.002],
    ],
)
def test_no_spread_gives_no_interval_and_no_p(diffs):
    assert 0 < abs(diffs[0] - diffs[1]) < 1e-12 or diffs[0] == diffs[1]
    assert no_spread(diffs)
    assert t_interval(diffs) is None and t_test_p(diffs) is None


def test_small_but_real_spread_keeps_its_interval():
    diffs = [0.012, 0.014]  # one item apart on a 500-item split
    assert not no_spread(diffs) and not no_spread([0.5])
    low, high = t_interval(diffs)
    assert low < 0.013 < high and high - low > 0.01
    assert 0 < t_test_p(diffs) < 1


def binomial_two_sided(b: int, c: int) -> float:
    """P(min(B, C) <= min(b, c)) for B ~ Bin(b + c, 1/2), by enumerating every outcome."""
    n = b + c
    total = Fraction(0)
    for heads in range(n + 1):
        if min(heads, n - heads) <= min(b, c):
            total += Fraction(math.factorial(n), math.factorial(heads) * math.factorial(n - heads))
    return float(min(Fraction(1), total / 2**n))


@pytest.mark.parametrize("b, c", [(2, 9), (9, 2), (0, 7), (5, 5), (12, 30), (1, 0), (40, 61)])
def test_mcnemar_against_the_binomial(b, c):
    assert mcnemar_exact(b, c) == pytest.approx(binomial_two_sided(b, c), rel=1e-12)


def test_mcnemar_small_cases():
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(2, 9) == pytest.approx(2 * (1 + 11 + 55) / 2**11)
    assert mcnemar_exact(0, 6) == pytest.approx(2 / 64)


def test_paired_bootstrap_is_fixed_and_near_the_normal_interval():
    diffs = [1.0] * 60 + [-1.0] * 40 + [0.0] * 400  # 500 items, mean +0.04
    first = paired_bootstrap(diffs)
    assert first == paired_bootstrap(diffs)  # the same seed: the same interval
    assert paired_bootstrap(diffs, seed=1) != first
    mean = statistics.fmean(diffs)
    half = 1.96 * statistics.pstdev(diffs) / math.sqrt(len(diffs))
    assert first[0] == pytest.approx(mean - half, abs=0.004)
    assert first[1] == pytest.approx(mean + half, abs=0.004)
    assert paired_bootstrap([0.5] * 20) == pytest.approx((0.5, 0.5))
    assert paired_bootstrap([]) is None


def write_predictions(run_dir: Path, correct: list[bool], tasks: list[str] | None = None) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    rows = [
        {"prompt": f"q{i}", "gold": 0, "pred": 0 if ok else 1, "correct": ok}
        | ({"task": tasks[i]} if tasks else {})
        for i, ok in enumerate(correct)
    ]
    (run_dir / PREDICTIONS).write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_item_tests_from_prediction_files(tmp_path):
    tasks = ["siqa"] * 6 + ["quartz"] * 4
    mine = {
        "1": [1, 1, 1, 0, 1, 0, 1, 1, 0, 0],
        "2": [1, 0, 1, 1, 1, 1, 0, 1, 1, 0],
    }
    base = {
        "1": [0, 1, 0, 0, 1, 1, 1, 0, 0, 1],
        "2": [1, 0, 0, 1, 0, 1, 0, 1, 0, 0],
    }
    outputs = []
    for seed in ("1", "2"):
        write_predictions(tmp_path / f"a{seed}", [bool(x) for x in mine[seed]], tasks)
        write_predictions(tmp_path / f"b{seed}", [bool(x) for x in base[seed]], tasks)
        outputs.append((seed, str(tmp_path / f"a{seed}"), str(tmp_path / f"b{seed}")))
    paired = Paired({"variant": "a"}, {"variant": "b"}, ["1", "2"], {}, outputs)
    tests = item_tests(paired)
    assert set(tests) == {"accuracy", "siqa_accuracy", "quartz_accuracy"}
    for metric, index in (
        ("accuracy", range(10)),
        ("siqa_accuracy", range(6)),
        ("quartz_accuracy", range(6, 10)),
    ):
        test = tests[metric]
        assert test.items == len(index)
        for seed_test, seed in zip(test.per_seed, ("1", "2"), strict=True):
            b = sum(mine[seed][i] and not base[seed][i] for i in index)
            c = sum(base[seed][i] and not mine[seed][i] for i in index)
            assert (seed_test.seed, seed_test.b, seed_test.c) == (seed, b, c)
            assert seed_test.p == pytest.approx(binomial_two_sided(b, c))
        per_item = [sum(mine[s][i] - base[s][i] for s in ("1", "2")) / 2 for i in index]
        assert test.mean == pytest.approx(statistics.fmean(per_item))
        low, high = test.interval
        assert min(per_item) <= low <= test.mean <= high <= max(per_item)
    # seed 1 of accuracy: b = 3 (items 0, 2, 7), c = 2 (items 5, 9)
    assert (tests["accuracy"].per_seed[0].b, tests["accuracy"].per_seed[0].c) == (3, 2)

    # predictions that do not line up (another test set) are not compared
    write_predictions(tmp_path / "b2", [True] * 9)
    assert [t.seed for t in item_tests(paired)["accuracy"].per_seed] == ["1"]
    assert item_tests(Paired({}, {}, ["1"], {}, [("1", str(tmp_path / "none"), "x")])) == {}


def two_arm_sweep(tmp_path, out, seeds, *arms):
    """A sweep file over ``seeds`` with one variant per ``(name, experts)`` arm; returns the file,
    its spec and its runs."""
    sweep = tmp_path / "p.yaml"
    variants = [{"name": name, "experts": experts} for name, experts in arms]
    sweep.write_text(
        yaml.safe_dump({"grid": {"seed": seeds}, "variants": variants, "output": str(out)})
    )
    spec = load_spec(str(sweep))
    return sweep, spec, spec.runs()


def test_report_with_per_item_tests_and_from_results(tmp_path, capsys):
    out = tmp_path / "out"
    sweep, spec, runs = two_arm_sweep(tmp_path, out, [1, 2, 3], ("square", 5), ("tri", 3))
    right = {  # (variant, seed) -> items right of 8
        ("square", "1"): [1, 0, 1, 0, 1, 0, 1, 0],
        ("square", "2"): [1, 1, 0, 0, 1, 0, 0, 0],
        ("square", "3"): [1, 0, 0, 1, 0, 1, 0, 0],
        ("tri", "1"): [1, 1, 1, 1, 1, 0, 1, 0],
        ("tri", "2"): [1, 1, 0, 0, 1, 0, 0, 1],
        ("tri", "3"): [0, 1, 1, 1, 0, 1, 0, 0],
    }
    states = {}
    for r in runs:
        correct = right[(r.labels["variant"], r.labels["seed"])]
        write_predictions(Path(r.output), [bool(x) for x in correct])
        accuracy = sum(correct) / len(correct)
        states[r.name] = RunState("done", {"fine_tuned": {"accuracy": accuracy, "n": 8}})
    text = write_report(spec, runs, states, ("variant", "square"))
    data = json.loads((out / "results.json").read_text())
    row = data["paired"]["groups"][0]
    diffs = [(sum(right[("tri", s)]) - sum(right[("square", s)])) / 8 for s in "123"]
    assert row["diffs"]["accuracy"] == pytest.approx([2 / 8, 1 / 8, 1 / 8])
    mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    assert row["accuracy_diff_ci95"] == pytest.approx(
        [mean - 4.303 * sd / 3**0.5, mean + 4.303 * sd / 3**0.5], abs=1e-4
    )
    assert row["accuracy_resolved"] is False and row["accuracy_above"] == 3  # [-1.26, +34.59]
    seeds = row["items"]["accuracy"]["seeds"]
    assert [(t["b"], t["c"]) for t in seeds] == [(2, 0), (1, 0), (2, 1)]
    assert seeds[0]["p"] == pytest.approx(binomial_two_sided(2, 0))  # 0.5
    assert "| tri | 1,2,3 | +16.67 [-1.26, +34.59] | +25.00, +12.50, +12.50 | 3 of 3 |" in text
    assert "| no | 0.5 (2/0), 1 (1/0), 1 (2/1) |" in text

    # the same numbers from the results.json alone (no run dirs, no per-item tests)
    groups = groups_from_results(data)
    assert [(g.labels, g.seeds, g.values) for g in groups] == [
        (g.labels, g.seeds, g.values) for g in group_runs(runs, states)
    ]
    again = paired_differences(groups, "variant", "square")[0]
    assert again.diffs["accuracy"] == pytest.approx(diffs) and again.outputs == []
    saved = tmp_path / "saved.json"
    saved.write_text(json.dumps(data))
    for r in runs:
        (Path(r.output) / PREDICTIONS).unlink()
    assert main(["sweep", str(sweep), "--report", "--baseline", "variant=square",
                 "--from-results", str(saved)]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "6 of 6 runs finished" in printed and "+16.67 [-1.26, +34.59]" in printed
    assert all(run_state(r).status == "pending" for r in runs)  # nothing read from the run dirs
    for args, message in (
        (["--from-results", str(saved)], "only with --report"),
        (["--report", "--from-results", str(tmp_path / "nope.json")], "cannot read"),
        (["--report", "--from-results", str(sweep)], "cannot read"),
    ):
        assert main(["sweep", str(sweep), *args]) == 2
        assert message in capsys.readouterr().err
    saved.write_text(json.dumps({"groups": []}))
    assert main(["sweep", str(sweep), "--report", "--from-results", str(saved)]) == 2
    assert "not a mola sweep results.json" in capsys.readouterr().err


def test_list_names_a_missing_allocation_file_and_goes_on(tmp_path, tiny_llama_dir, capsys):
    sweep = tmp_path / "s.yaml"
    sweep.write_text(
        yaml.safe_dump(
            {
                "base": {"model": str(tiny_llama_dir), "top_k": 1},
                "grid": {"seed": [1]},
                "variants": [
                    {"name": "later", "allocation": str(tmp_path / "not_yet.yaml")},
                    {"name": "two", "experts": 2},
                ],
                "output": str(tmp_path / "out"),
            }
        )
    )
    assert main(["sweep", str(sweep), "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("[1/2] later_seed-1: pending (size unknown: --allocation: file ")
    assert lines[0].endswith("not_yet.yaml not found)")
    assert lines[1].startswith("[2/2] two_seed-1: pending (4 experts, ")


def test_report_says_no_spread_instead_of_resolved(tmp_path):
    """Two seeds, each +1.2 points (the rank-1 pilot's sarcasm row): equal differences are no
    evidence, so no interval, no p-value and 'n/a (no spread)', not a (near) zero-width 'yes'."""
    out = tmp_path / "out"
    sweep, spec, runs = two_arm_sweep(tmp_path, out, [1, 2], ("lora", 1), ("square", 5))
    accuracy = {("lora", "1"): 0.656, ("lora", "2"): 0.686, ("square", "1"): 0.668,
                ("square", "2"): 0.698}  # fmt: skip
    states = {
        r.name: RunState(
            "done", {"fine_tuned": {"accuracy": accuracy[(r.labels["variant"], r.labels["seed"])]}}
        )
        for r in runs
    }
    text = write_report(spec, runs, states, ("variant", "lora"))
    row = json.loads((out / "results.json").read_text())["paired"]["groups"][0]
    assert row["diffs"]["accuracy"] == pytest.approx([0.012, 0.012])
    assert row["accuracy_diff_ci95"] is None and row["accuracy_p"] is None
    assert row["accuracy_resolved"] is False and row["accuracy_above"] == 2
    assert "| square | 1,2 | +1.20 | +1.20, +1.20 | 2 of 2 |  | n/a (no spread) |" in text


def write_log(run_dir: Path, losses: list[float], epochs: float = 1.0, key: str = "lm_loss"):
    """A train_log.jsonl as the trainer writes it: a row every 10 steps, then the summary row."""
    run_dir.mkdir(parents=True, exist_ok=True)
    n = len(losses)
    rows = [
        {"loss": v + 0.5, key: v, "epoch": epochs * (i + 1) / n, "step": 10 * (i + 1)}
        for i, v in enumerate(losses)
    ]
    rows.append({"train_runtime": 1.0, "train_loss": 9.0, "epoch": epochs, "step": 10 * n})
    (run_dir / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_one_pass_loss_reads_the_last_fifth_of_a_one_pass_log(tmp_path):
    losses = [5.0, 4.0, 3.0, 2.9, 2.8, 2.7, 2.6, 2.5, 2.2, 2.0]  # steps 10..100
    write_log(tmp_path / "a", losses)
    assert one_pass_loss(str(tmp_path / "a")) == pytest.approx((2.2 + 2.0) / 2)  # steps 90, 100
    assert one_pass_loss(str(tmp_path / "a"), tail=0.5) == pytest.approx(
        statistics.fmean(losses[5:])
    )
    write_log(tmp_path / "b", losses, key="aux_only")  # no lm_loss: the logged loss
    assert one_pass_loss(str(tmp_path / "b")) == pytest.approx((2.2 + 2.0) / 2 + 0.5)
    write_log(tmp_path / "c", losses, epochs=2.0)  # items seen twice: not a held-out loss
    assert one_pass_loss(str(tmp_path / "c")) is None
    assert one_pass_loss(str(tmp_path / "missing")) is None
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "train_log.jsonl").write_text("{not json\n")
    assert one_pass_loss(str(tmp_path / "d")) is None


def test_report_pairs_the_one_pass_loss_lower_is_better(tmp_path):
    out = tmp_path / "out"
    sweep, spec, runs = two_arm_sweep(tmp_path, out, [1, 2, 3], ("lora", 1), ("square", 5))
    tail = {("lora", "1"): 1.97, ("lora", "2"): 1.95, ("lora", "3"): 1.93,
            ("square", "1"): 1.945, ("square", "2"): 1.93, ("square", "3"): 1.935}  # fmt: skip
    states = {}
    for r in runs:
        key = (r.labels["variant"], r.labels["seed"])
        write_log(Path(r.output), [3.0] * 8 + [tail[key]] * 2)
        states[r.name] = RunState("done", {"fine_tuned": {"accuracy": 0.5}})
    text = write_report(spec, runs, states, ("variant", "lora"))
    data = json.loads((out / "results.json").read_text())
    lora = next(g for g in data["groups"] if g["variant"] == "lora")
    assert lora["values"]["one_pass_loss"] == pytest.approx([1.97, 1.95, 1.93])
    row = data["paired"]["groups"][0]
    diffs = [-0.025, -0.02, 0.005]
    assert row["diffs"]["one_pass_loss"] == pytest.approx(diffs)
    mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    low, high = mean - 4.303 * sd / 3**0.5, mean + 4.303 * sd / 3**0.5
    assert row["one_pass_loss_diff_ci95"] == pytest.approx([low, high], abs=1e-4)
    assert row["one_pass_loss_above"] == 2  # two seeds with a lower loss are ahead
    assert f"| square | one_pass_loss | 1,2,3 | {mean:+.3f} [{low:+.3f}, {high:+.3f}] |" in text
    assert "-0.025, -0.020, +0.005 | 2 of 3 |" in text
