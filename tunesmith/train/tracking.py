"""Experiment tracking: TensorBoard event files in every run folder; MLflow when configured.

Trackers listen to the same event stream as `on_event` (the rows of metrics.jsonl), so the loop
knows nothing of them. Names are shared by both backends:
    train/<key>   each training log row (loss, lr, grad_norm, tokens_per_s, token accuracy ...)
    eval/<key>    each validation row (loss and the task's metrics)
    before/<m>, final/<m>   the held-out evaluation of the untrained base and of the trained model
Hyperparameters are the flattened config ('train.lr', 'method.r', ...).

Only process 0 tracks (train/__init__.py opens the trackers there). A tracking failure during
training is reported as a message and turns that tracker off; the run goes on, since metrics.jsonl
and the report hold every figure. Opening a tracker fails loudly, before the first step.
"""
from __future__ import annotations

import json
import os
import socket
import struct
import time
from pathlib import Path
from typing import Any, Callable

import yaml
from pydantic import BaseModel
from pydantic_core import to_jsonable_python

from tunesmith.config import MlflowConfig, RunConfig
from tunesmith.errors import ConfigError, TunesmithError

EventFn = Callable[[dict[str, Any]], None]

MLFLOW_INSTALL = "install MLflow: pip install 'tunesmith[mlflow]'"
# Row keys that place a row (the x axis) rather than measure something.
_PLACE = frozenset({"kind", "step", "total_steps"})
_MLFLOW_PARAM_CHARS = 6000  # MLflow rejects longer parameter values; config.yaml is logged whole beside them
_MLFLOW_BATCH = 100  # MLflow's per-call limit on parameters


def check_tracking(cfg: RunConfig) -> None:
    """Fail before anything is loaded when a configured tracker's package is missing."""
    if cfg.track.mlflow.tracking_uri:
        try:
            import mlflow  # noqa: F401
        except ImportError as e:
            raise ConfigError(f"track.mlflow.tracking_uri is set: {MLFLOW_INSTALL} ({e})") from e


def flat_params(cfg: RunConfig) -> dict[str, str | int | float | bool]:
    """The config as dotted name -> scalar, section by section; lists, mappings and None as JSON text."""
    out: dict[str, Any] = {}

    def walk(section: BaseModel, prefix: str) -> None:
        for name in type(section).model_fields:
            v = getattr(section, name)
            if isinstance(v, BaseModel):
                walk(v, f"{prefix}{name}.")
            else:
                v = v if isinstance(v, (str, int, float, bool)) else json.dumps(to_jsonable_python(v))
                out[f"{prefix}{name}"] = v
    # Validated again from its JSON form, as config.yaml is read back: a default such as train.epochs=3
    # is then 3.0, the same parameter in this run and in one started from its config.yaml.
    walk(RunConfig.model_validate(cfg.model_dump(mode="json")), "")
    return out


def row_scalars(row: dict[str, Any]) -> dict[str, float]:
    """A train/eval row's measurements as '<kind>/<key>' -> number (flags and placement left out)."""
    return {f"{row['kind']}/{k}": float(v) for k, v in row.items()
            if k not in _PLACE and isinstance(v, (int, float)) and not isinstance(v, bool)}


def result_scalars(before: dict | None, after: dict) -> dict[str, float]:
    """The held-out evaluation's numeric metrics as 'before/<m>' and 'final/<m>'."""
    out = {f"final/{k}": float(v) for k, v in after["metrics"].items()
           if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if before is not None:
        out |= {f"before/{k}": float(v) for k, v in before["metrics"].items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return out


class EventFile:
    """One TensorBoard event file (TFRecord-framed `Event` protobufs, tensorboardX's messages),
    appended synchronously and opened only for each write. tensorboardX's own SummaryWriter
    writes from a thread that dies on a disk error, after which its bounded queue blocks the
    training loop; and a file held open keeps a failing volume from being remounted read-only.
    Here a write error raises in the caller (Trackers reports it and goes on)."""

    def __init__(self, folder: Path, purge_step: int | None):
        from tensorboardX.proto.event_pb2 import Event, SessionLog

        folder.mkdir(parents=True, exist_ok=True)
        # TensorBoard reads a folder's files in name order: the time first; pid and ns keep a
        # resumed attempt's file apart from the first attempt's, begun in the same second.
        self.path = folder / f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}.{time.time_ns()}"
        first = [Event(wall_time=time.time(), file_version="brain.Event:2")]
        if purge_step is not None:  # as SummaryWriter(purge_step=...): hide earlier files' steps >= purge_step
            first = [Event(wall_time=time.time(), step=purge_step, file_version="brain.Event:2"),
                     Event(wall_time=time.time(), step=purge_step, session_log=SessionLog(status=SessionLog.START))]
        self._append(first)

    def add(self, summaries: list, step: int) -> None:
        from tensorboardX.proto.event_pb2 import Event

        self._append([Event(wall_time=time.time(), step=step, summary=s) for s in summaries])

    def _append(self, events: list) -> None:
        from tensorboardX.record_writer import masked_crc32c

        out = bytearray()
        for e in events:  # TFRecord: length, its CRC, the data, its CRC
            data = e.SerializeToString()
            header = struct.pack("Q", len(data))
            out += header + struct.pack("I", masked_crc32c(header)) + data + struct.pack("I", masked_crc32c(data))
        with self.path.open("ab") as f:
            f.write(out)


class TensorBoardTracker:
    """Event files under RUN/tensorboard (tensorboardX's protobufs and summaries, no TensorFlow)."""

    name = "tensorboard"

    def __init__(self, cfg: RunConfig, run_dir: Path, resume_step: int | None):
        # A resumed run replays the steps after its checkpoint; purge_step hides the first attempt's
        # points from there on, as metrics.jsonl drops its rows.
        self.events = EventFile(run_dir / "tensorboard", None if resume_step is None else resume_step + 1)
        self.cfg = cfg
        if resume_step is None:  # the whole config, readable in the Text tab
            from tensorboardX.summary import text

            config = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
            self.events.add([text("config", "```\n" + config + "```")], 0)

    def row(self, row: dict[str, Any]) -> None:
        from tensorboardX.summary import scalar

        self.events.add([scalar(tag, v) for tag, v in row_scalars(row).items()], row["step"])

    def finish(self, before: dict | None, after: dict, summary: dict[str, Any], saved: Path) -> None:
        from tensorboardX.summary import hparams, scalar

        final = result_scalars(before, after)
        self.events.add([scalar(tag, v) for tag, v in final.items()], summary["steps"])
        # The HParams tab: the flattened config against the final metrics, in this run's own file
        # (SummaryWriter.add_hparams would make a sub-run folder of its own).
        exp, ssi, sei = hparams(flat_params(self.cfg), {k: v for k, v in final.items() if k.startswith("final/")})
        self.events.add([exp, ssi, sei], 0)

    def close(self, status: str) -> None:
        """Nothing is held open between writes."""


class MlflowTracker:
    """One MLflow run per tunesmith run, through MlflowClient (no global 'active run': the job
    service trains in threads). A resumed run continues the same MLflow run (RUN/mlflow_run.json)."""

    name = "mlflow"

    def __init__(self, cfg: RunConfig, run_dir: Path, resume_step: int | None):
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        mc: MlflowConfig = cfg.track.mlflow
        self.mc, self.run_dir = mc, run_dir
        try:
            self.client = MlflowClient(tracking_uri=mc.tracking_uri)
            exp_id = self._experiment(mc)
            id_file = run_dir / "mlflow_run.json"
            if resume_step is not None and id_file.is_file():
                self.run_id = json.loads(id_file.read_text())["run_id"]
                self.client.update_run(self.run_id, status="RUNNING")
                return
            run = self.client.create_run(exp_id, run_name=mc.run_name or cfg.output.name, tags={
                "tunesmith.run_dir": str(run_dir.resolve()), "tunesmith.task": cfg.task,
                "tunesmith.method": cfg.method.name, "tunesmith.base_model": str(cfg.model.name_or_path)})
        except MlflowException as e:
            raise TunesmithError(f"track.mlflow ({mc.tracking_uri}): {e.message}") from e
        self.run_id = run.info.run_id
        id_file.write_text(json.dumps({"run_id": self.run_id, "tracking_uri": mc.tracking_uri,
                                       "experiment_id": exp_id}, indent=2))
        from mlflow.entities import Param

        params = [Param(k, str(v)[:_MLFLOW_PARAM_CHARS]) for k, v in flat_params(cfg).items()]
        for i in range(0, len(params), _MLFLOW_BATCH):
            self.client.log_batch(self.run_id, params=params[i: i + _MLFLOW_BATCH])

    def _experiment(self, mc: MlflowConfig) -> str:
        from mlflow.exceptions import MlflowException

        exp = self.client.get_experiment_by_name(mc.experiment)
        if exp is not None:
            return exp.experiment_id
        try:
            return self.client.create_experiment(mc.experiment, artifact_location=mc.artifact_location)
        except MlflowException:  # another process (a search's trials) created it first
            exp = self.client.get_experiment_by_name(mc.experiment)
            if exp is None:
                raise
            return exp.experiment_id

    def _metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def row(self, row: dict[str, Any]) -> None:
        self._metrics(row_scalars(row), row["step"])

    def finish(self, before: dict | None, after: dict, summary: dict[str, Any], saved: Path) -> None:
        self._metrics(result_scalars(before, after), summary["steps"])
        # The run folder's own files: report, model card, config, metrics log, figures.
        for f in sorted(self.run_dir.iterdir()):
            if f.is_file():
                self.client.log_artifact(self.run_id, str(f))
        size_mb = sum(p.stat().st_size for p in saved.rglob("*") if p.is_file()) / 2**20
        if size_mb <= self.mc.max_model_mb:
            self.client.log_artifacts(self.run_id, str(saved), artifact_path=saved.name)
        self.client.set_tag(self.run_id, "tunesmith.model_path", str(saved.resolve()))
        self.client.set_tag(self.run_id, "tunesmith.model_mb", f"{size_mb:.1f}")
        self.close("FINISHED")

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)


class Trackers:
    """The run's trackers behind one listener; each failure is said once and turns its tracker off."""

    def __init__(self, trackers: list, say: Callable[[str], None]):
        self.trackers, self.say = trackers, say

    def _each(self, what: str, call: Callable[[Any], None]) -> None:
        for t in list(self.trackers):
            try:
                call(t)
            except Exception as e:  # noqa: BLE001 - reported, not swallowed: the run goes on without it
                self.trackers.remove(t)
                self.say(f"warning: {t.name}: could not {what} ({type(e).__name__}: {e}); {t.name} tracking is off "
                         "for the rest of this run (metrics.jsonl and the report have every figure)")

    def listen(self, on_event: EventFn | None) -> EventFn:
        """`on_event`, plus the train/eval rows to every tracker."""
        def emit(event: dict[str, Any]) -> None:
            if event.get("kind") in ("train", "eval"):
                self._each(f"log step {event.get('step')}", lambda t: t.row(event))
            if on_event:
                on_event(event)
        return emit

    def finish(self, before: dict | None, after: dict, summary: dict[str, Any], saved: Path) -> None:
        self._each("log the final results", lambda t: t.finish(before, after, summary, saved))

    def close(self, status: str) -> None:
        """A run that stopped early: KILLED (cancelled) or FAILED."""
        self._each(f"mark the run {status}", lambda t: t.close(status))


def open_trackers(cfg: RunConfig, run_dir: Path, resume_step: int | None, say: Callable[[str], None]) -> Trackers:
    """The trackers the config asks for, opened (process 0 only). Raises on a tracker that cannot start."""
    out: list = []
    try:
        if cfg.track.tensorboard:
            out.append(TensorBoardTracker(cfg, run_dir, resume_step))
        if cfg.track.mlflow.tracking_uri:
            out.append(MlflowTracker(cfg, run_dir, resume_step))
    except BaseException:
        for t in out:
            t.close("FAILED")
        raise
    return Trackers(out, say)
