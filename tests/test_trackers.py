"""``--report-to``: TensorBoard, W&B (offline) and MLflow (local file store) on a real run.

One short training run reports to every tracker installed here; each tracker's test reads
what that tracker wrote to disk: the resolved mola options as the run config and the router
losses as series of their own. A tracker whose package is missing is skipped with the reason.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import struct

import pytest

from mola.training.options import TrainOptions
from mola.training.trackers import TRACKERS, check_installed, parse_report_to

INSTALLED = [name for name in TRACKERS if importlib.util.find_spec(name) is not None]
SERIES = ("lm_loss", "aux_loss", "router_z_loss")
STEPS = 2


def needs(name: str):
    return pytest.mark.skipif(
        name not in INSTALLED, reason=f"{name} is not installed: pip install 'mola-lora[trackers]'"
    )


@pytest.fixture(scope="module")
def run(tiny_llama_dir, tmp_path_factory):
    """Train 2 steps reporting to every installed tracker; returns the temporary root."""
    from mola.cli import main

    root = tmp_path_factory.mktemp("trackers")
    data = root / "d.jsonl"
    data.write_text(json.dumps({"instruction": "Name a fruit.", "output": "apple"}) + "\n")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("WANDB_MODE", "offline")
        env.setenv("WANDB_DIR", str(root))
        env.setenv("WANDB_SILENT", "true")
        env.setenv("WANDB_PROJECT", "mola-test")
        env.setenv("MLFLOW_TRACKING_URI", (root / "mlruns").as_uri())
        env.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps file stores opt-in
        env.setenv("MLFLOW_EXPERIMENT_NAME", "mola-test")
        args = ["train", "--model", str(tiny_llama_dir), "--data", str(data), "--no-eval"]
        args += ["--max-steps", str(STEPS), "--logging-steps", "1", "--save-steps", "0"]
        args += ["--experts", "2", "--r", "2", "--batch-size", "1", "--router-z-loss-coef"]
        args += ["0.01", "--output", str(root / "run"), "--report-to", ",".join(INSTALLED)]
        assert main([*args, "--no-progress"]) == 0
    return root


def _options(root) -> dict:
    import yaml

    return yaml.safe_load((root / "run" / "train_config.yaml").read_text())


def wandb_records(path: str):
    """The records of a W&B ``.wandb`` file (a LevelDB-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(path, "rb").read()
    block, pos, pending = 32768, 7, b""  # 7: the ":W&B" header, magic and version
    while pos + 7 <= len(data):
        room = block - pos % block
        if room < 7:  # a block's tail too short for a record header is padding
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            pos += room
            continue
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST piece of a record
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


@needs("wandb")
def test_wandb_offline_run_has_options_and_router_series(run):
    (path,) = glob.glob(str(run / "wandb" / "offline-run-*" / "run-*.wandb"))
    config, history = {}, []
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "config":
            config.update({i.key: i.value_json for i in record.config.update})
        elif kind == "history":
            history.append(
                {i.key or "/".join(i.nested_key): i.value_json for i in record.history.item}
            )
    assert json.loads(config["mola"]) == _options(run)
    steps = [h for h in history if "train/loss" in h]
    assert len(steps) == STEPS
    for name in SERIES:
        assert all(f"train/{name}" in h for h in steps), name
    assert float(steps[0]["train/router_z_loss"]) > 0


@needs("mlflow")
def test_mlflow_file_store_has_options_and_router_series(run):
    from mlflow.tracking import MlflowClient

    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        client = MlflowClient(tracking_uri=(run / "mlruns").as_uri())
        experiment = client.get_experiment_by_name("mola-test")
        (found,) = client.search_runs([experiment.experiment_id])
        params = found.data.params
        options = _options(run)
        assert params["mola.router"] == options["router"] == "topk"
        assert params["mola.report_to"] == ",".join(INSTALLED)
        assert json.loads(params["mola.router_z_loss_coef"]) == 0.01
        for name in SERIES:
            history = client.get_metric_history(found.info.run_id, name)
            assert [m.step for m in history] == list(range(1, STEPS + 1)), name
        assert found.info.status == "FINISHED"


@needs("tensorboard")
def test_tensorboard_has_options_text_and_router_series(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "run" / "logs"), size_guidance={"tensors": 0})
    events.Reload()
    for name in SERIES:
        assert len(events.Scalars(f"train/{name}")) == STEPS, name
    (text,) = events.Tensors("mola_options/text_summary")
    shown = text.tensor_proto.string_val[0].decode()
    assert json.loads(shown.strip("`\n")) == _options(run)


def test_report_to_parsing_and_errors():
    assert parse_report_to("wandb, mlflow") == ["wandb", "mlflow"]
    assert parse_report_to("none") == []
    assert parse_report_to(["tensorboard", "tensorboard"]) == ["tensorboard"]
    with pytest.raises(ValueError, match="unknown tracker 'comet'"):
        parse_report_to("comet")
    with pytest.raises(ValueError, match="'none' with wandb"):
        parse_report_to("none,wandb")
    with pytest.raises(ValueError, match="--report-to: unknown tracker"):
        TrainOptions(report_to="tensorbored")
    assert TrainOptions(report_to="none").report_to == "none"


def test_missing_tracker_package_is_named(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    with pytest.raises(ValueError, match=r"--report-to wandb: the wandb package is missing: pip"):
        check_installed(["tensorboard", "wandb"])


@needs("mlflow")
def test_mlflow_store_that_cannot_open_fails_before_the_work(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with pytest.raises(ValueError, match=r"^--report-to mlflow: cannot open the tracking store"):
        check_installed(["mlflow"])
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    check_installed(["mlflow"])
