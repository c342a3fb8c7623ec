"""Experiment tracking (issue 23 §3): the TensorBoard events and the MLflow run of a real training
run, read back with each tool's own reader (tensorboard's EventAccumulator, MLflow's MlflowClient)
and compared with the run's metrics.jsonl, run.json and eval_report.json."""
from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import pytest

from tests.conftest import write_jsonl
from tunesmith.config import load_config
from tunesmith.errors import ConfigError, TrainingCancelled, TunesmithError
from tunesmith.train import train
from tunesmith.train.tracking import TensorBoardTracker, Trackers, flat_params

# TensorBoard stores scalars as float32
F32 = 1e-6


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _config(tmp: Path, model: Path, **track) -> dict:
    rows = [{"text": f"a {'good great' if i % 2 else 'bad awful'} film {i}", "label": "positive" if i % 2 else "negative"}
            for i in range(64)]
    data = write_jsonl(tmp / "train.jsonl", rows)
    return {"model": {"name_or_path": str(model)},
            "data": {"train": str(data), "val_size": 16, "test_size": 16, "max_length": 16},
            "method": {"name": "lora", "r": 4, "target_modules": "all-linear"},
            "train": {"max_steps": 4, "batch_size": 16, "lr": 3e-3, "log_every": 1, "eval_every": 2},
            "eval": {"bootstrap_resamples": 100, "num_samples": 2},
            "output": {"dir": str(tmp / "runs" / "{name}"), "name": "tracked"}, "track": track}


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory, tiny_bert):
    """One short LoRA run with TensorBoard (the default) and MLflow on a local SQLite store,
    cancelled after step 2 and resumed: both trackers must carry on across the resume."""
    tmp = tmp_path_factory.mktemp("tracked")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    cfg = _config(tmp, tiny_bert, mlflow={"tracking_uri": uri, "experiment": "tests", "artifact_location": str(tmp / "art")})
    cancel = threading.Event()

    def stop_after_step_2(event):
        if event.get("kind") == "train" and event["step"] == 2:
            cancel.set()
    with pytest.raises(TrainingCancelled, match="stopped at step 2"):
        train(cfg, on_event=stop_after_step_2, cancel=cancel)
    run_id = json.loads((tmp / "runs" / "tracked" / "mlflow_run.json").read_text())["run_id"]
    from mlflow.tracking import MlflowClient

    assert MlflowClient(tracking_uri=uri).get_run(run_id).info.status == "KILLED"
    result = train(cfg, resume=True)
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    return result, rows, uri


def test_tensorboard_events_equal_the_runs_metrics(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    result, rows, _ = tracked_run
    ea = EventAccumulator(str(result.run_dir / "tensorboard"), size_guidance={"scalars": 0})
    ea.Reload()
    scalars = {tag: {e.step: e.value for e in ea.Scalars(tag)} for tag in ea.Tags()["scalars"]}
    for tag in ("train/loss", "train/lr", "train/grad_norm", "eval/loss", "eval/accuracy", "final/accuracy",
                "before/accuracy"):
        assert tag in scalars, (tag, sorted(scalars))
    assert sorted(scalars["train/loss"]) == [1, 2, 3, 4] and sorted(scalars["eval/accuracy"]) == [2, 4]
    assert len(list((result.run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 2  # first attempt + resume
    # every measurement of every metrics.jsonl row, at its step
    for row in rows:
        for k, v in row.items():
            if k not in ("step", "total_steps") and _number(v):
                assert scalars[f"{row['kind']}/{k}"][row["step"]] == pytest.approx(v, rel=F32, abs=1e-12), (row, k)
    assert all(v > 0 for v in scalars["train/grad_norm"].values())
    # the held-out evaluation: trained (run.json) and untrained (the report's before)
    summary = json.loads((result.run_dir / "run.json").read_text())
    report = json.loads((result.run_dir / "eval_report.json").read_text())
    for k, v in summary["final_metrics"].items():
        assert scalars[f"final/{k}"][4] == pytest.approx(v, rel=F32, abs=1e-12), k
    for k, v in report["before"]["metrics"].items():
        if _number(v):
            assert scalars[f"before/{k}"][4] == pytest.approx(v, rel=F32, abs=1e-12), k
    # hyperparameters: the HParams tab's session holds the flattened config
    content = ea.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hp = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    expected = flat_params(load_config(result.run_dir / "config.yaml"))
    assert set(hp) == set(expected) and "train.lr" in hp and "method.r" in hp
    for k, v in expected.items():
        got = {"number_value": hp[k].number_value, "string_value": hp[k].string_value,
               "bool_value": hp[k].bool_value}[hp[k].WhichOneof("kind")]
        assert got == (pytest.approx(v, rel=F32) if _number(v) else v), k


def test_mlflow_run_reads_back_through_mlflows_client(tracked_run):
    from mlflow.tracking import MlflowClient

    result, rows, uri = tracked_run
    client = MlflowClient(tracking_uri=uri)
    run_id = json.loads((result.run_dir / "mlflow_run.json").read_text())["run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    # the resumed run continued the same MLflow run
    assert [r.info.run_id for r in client.search_runs([run.info.experiment_id])] == [run_id]
    assert client.get_experiment(run.info.experiment_id).name == "tests"
    # parameters: the whole flattened config
    expected = {k: str(v) for k, v in flat_params(load_config(result.run_dir / "config.yaml")).items()}
    assert run.data.params == expected
    # metrics per step: each metrics.jsonl row; final and before: the report's
    for row in rows:
        for k, v in row.items():
            if k not in ("step", "total_steps") and _number(v):
                history = {m.step: m.value for m in client.get_metric_history(run_id, f"{row['kind']}/{k}")}
                assert history[row["step"]] == pytest.approx(v, rel=1e-12), (row, k)
    summary = json.loads((result.run_dir / "run.json").read_text())
    for k, v in summary["final_metrics"].items():
        assert run.data.metrics[f"final/{k}"] == pytest.approx(v, rel=1e-12)
    before = json.loads((result.run_dir / "eval_report.json").read_text())["before"]["metrics"]
    assert run.data.metrics["before/accuracy"] == pytest.approx(before["accuracy"], rel=1e-12)
    # artifacts: the report, the model card, the config and log, and the adapter's files
    top = {a.path for a in client.list_artifacts(run_id)}
    for f in ("README.md", "eval_report.md", "eval_report.json", "config.yaml", "metrics.jsonl", "run.json", "adapter"):
        assert f in top, (f, top)
    assert {"adapter/adapter_model.safetensors", "adapter/adapter_config.json"} <= \
        {a.path for a in client.list_artifacts(run_id, "adapter")}
    card = Path(client.download_artifacts(run_id, "README.md", str(result.run_dir.parent)))
    assert card.read_text() == (result.run_dir / "README.md").read_text()
    assert run.data.tags["tunesmith.model_path"] == str((result.run_dir / "adapter").resolve())


def test_mlflow_configured_but_missing_fails_before_training(tmp_path, tiny_bert, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` raises ImportError
    cfg = _config(tmp_path, tiny_bert, mlflow={"tracking_uri": f"sqlite:///{tmp_path / 'm.db'}"})
    with pytest.raises(ConfigError, match=r"install MLflow: pip install 'tunesmith\[mlflow\]'"):
        train(cfg)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "m.db").exists()


def test_a_bad_mlflow_store_is_a_clear_error_before_training(tmp_path, tiny_bert):
    cfg = _config(tmp_path, tiny_bert, mlflow={"tracking_uri": "bogus://nowhere"})
    with pytest.raises(TunesmithError, match=r"track.mlflow \(bogus://nowhere\): .*unsupported URI"):
        train(cfg)
    assert not (tmp_path / "runs" / "tracked").exists()  # nothing half-written


def test_a_resumed_run_hides_the_first_attempts_later_steps(tmp_path):
    """A resume replays the steps after its checkpoint: TensorBoard shows the replayed values only."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = load_config({"data": {"train": "x"}})
    first = TensorBoardTracker(cfg, tmp_path, None)
    for step in range(1, 6):
        first.row({"kind": "train", "step": step, "loss": float(step)})
    first.close("KILLED")
    resumed = TensorBoardTracker(cfg, tmp_path, resume_step=2)  # the checkpoint was at step 2
    for step in (3, 4):
        resumed.row({"kind": "train", "step": step, "loss": 10.0 + step})
    resumed.close("FINISHED")
    ea = EventAccumulator(str(tmp_path / "tensorboard"))
    ea.Reload()
    assert [(e.step, e.value) for e in ea.Scalars("train/loss")] == [(1, 1.0), (2, 2.0), (3, 13.0), (4, 14.0)]


def test_a_failing_tracker_is_reported_and_the_others_go_on():
    class Broken:
        name = "broken"

        def row(self, row):
            raise OSError("disk full")

    class Kept:
        name = "kept"
        rows: list = []

        def row(self, row):
            self.rows.append(row["step"])

    said, seen = [], []
    trackers = Trackers([Broken(), Kept()], said.append)
    emit = trackers.listen(seen.append)
    for step in (1, 2):
        emit({"kind": "train", "step": step, "loss": 1.0})
    emit({"kind": "message", "text": "hello"})
    assert Kept.rows == [1, 2] and [e.get("step") for e in seen] == [1, 2, None]
    assert len(said) == 1 and "broken: could not log step 1 (OSError: disk full)" in said[0] and "off" in said[0]
