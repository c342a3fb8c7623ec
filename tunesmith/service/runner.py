"""One job's training, in a process of its own: `python -m tunesmith.service.runner JOB_ID --db URL
--data-dir DIR --worker-id W`. The worker (worker.py) starts it and holds the job's lease; a crash
here (CUDA error, OOM kill, a bug) ends this process, never the worker or the service.

It calls `tunesmith.train()` as a user would, and turns train()'s events into the job's rows:
  message     -> a message event
  train/eval  -> a metrics event (step, total_steps, train loss and accuracy / full validation metrics)
  checkpoint  -> a checkpoint row with the metrics at that step (and, for peft methods, the step's
                 adapter exported beside it, so `ft:...:ckpt-step-N` is servable and downloadable)
SIGTERM / SIGINT set train()'s cancel event: it stops at the next step boundary with a checkpoint;
the job then ends cancelled, paused or back in the queue, as its `requested` column says.

Exactly once across a lost worker: every event row carries the training step it belongs to. A run
resumed from the checkpoint at step S first deletes the rows the lost attempt wrote past S (as
train() truncates its own metrics.jsonl to S), then writes them again while it retrains those
steps; setup messages it repeats (data summary, device) are not written twice. Checkpoint rows
follow the checkpoint folders on disk (train() prunes old ones), so a row is never missing for a
checkpoint that exists, whichever moment the last worker died at.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from tunesmith.errors import ConfigError, DataError, TrainingCancelled, TunesmithError
from tunesmith.service import jobs as jobmod
from tunesmith.service.store import Store, StoreError

# train() rows' keys -> OpenAI's metrics names (train rows: the logged steps; eval rows: the full
# validation set, which OpenAI calls full_valid_*). Other numeric keys keep their name, prefixed.
TRAIN_KEYS = {"loss": "train_loss", "token_accuracy": "train_mean_token_accuracy", "accuracy": "train_accuracy",
              "lr": "learning_rate", "epoch": "epoch"}
EVAL_KEYS = {"loss": "full_valid_loss", "token_accuracy": "full_valid_mean_token_accuracy", "epoch": "epoch"}
SKIP = {"kind", "step", "total_steps", "tokens_per_s", "elapsed_s", "early_stop"}


def _die_with_parent(parent_pid: int) -> None:
    """A worker killed with -9 must not leave its training running (a second worker resumes the
    job; two trainings of one job would write one run folder). Linux: the kernel kills us with
    the worker (PR_SET_PDEATHSIG); elsewhere a thread notices the worker is gone."""
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:  # the worker died before prctl took effect
        os._exit(70)

    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(70)
            time.sleep(1)
    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


class JobRun:
    """The bookkeeping of one attempt at one job: the rows its train() events become."""

    def __init__(self, store: Store, job: dict, data_dir: Path, worker_id: str) -> None:
        self.store, self.job, self.data_dir, self.worker_id = store, job, data_dir, worker_id
        self.id = job["id"]
        self.step = 0
        self.total_steps = job.get("total_steps")
        self.seen_messages: set[str] = set()
        self.started = time.time()
        self.first_step: int | None = None
        self.checked = 0.0
        project = store.project(job["project_id"])
        self.model_name = jobmod.fine_tuned_name(job, project["name"] if project else job["project_id"])
        self.cfg = None
        self.run_dir = data_dir / jobmod.run_dir_of(job)

    # ---- train() events -> rows -----------------------------------------------------------------

    def on_event(self, e: dict[str, Any]) -> None:
        self._still_ours()
        kind = e.get("kind")
        if kind == "message":
            self.message(e["text"], "warn" if e["text"].lstrip().startswith("warning") else "info")
        elif kind == "train":
            self._progress(e)
            data = self._metrics(e, TRAIN_KEYS, "train_")
            loss = f"training loss={e['loss']:.4f}" if isinstance(e.get("loss"), (int, float)) else "trained"
            acc = next((f", {k}={data[k]:.3f}" for k in ("train_mean_token_accuracy", "train_accuracy") if k in data), "")
            self.store.add_event(self.id, "info", f"Step {self.step}/{self.total_steps}: {loss}{acc}", "metrics",
                                 data, step=self.step)
        elif kind == "eval":
            self._progress(e)
            data = self._metrics(e, EVAL_KEYS, "valid_")
            if "loss" in e:  # else there is no validation data: nothing to report
                shown = ", ".join(f"{k.removeprefix('full_')}={v:.4f}" for k, v in data.items()
                                  if k not in ("step", "total_steps", "epoch"))
                self.store.add_event(self.id, "info", f"Step {self.step}/{self.total_steps}: {shown}", "metrics",
                                     data, step=self.step)
        elif kind == "checkpoint":
            self.sync_checkpoints()

    def _still_ours(self, every_s: float = 2.0) -> None:
        """Stop writing at once if another worker holds the job (ours lost its lease without dying,
        e.g. cut off from the database for longer than the lease): two trainings of one job must
        never write the same run folder for more than a moment."""
        if time.time() - self.checked < every_s:
            return
        self.checked = time.time()
        job = self.store.job(self.id) or {}
        if job.get("worker_id") != self.worker_id or job.get("status") != "running":
            print(f"job {self.id} is no longer held by {self.worker_id}; stopping", file=sys.stderr, flush=True)
            os._exit(75)

    def message(self, text: str, level: str = "info") -> None:
        if text in self.seen_messages:  # a resumed attempt repeating its setup messages
            return
        self.seen_messages.add(text)
        self.store.add_event(self.id, level, text, step=self.step)

    def _progress(self, e: dict) -> None:
        self.step = int(e["step"])
        total = e.get("total_steps")
        if total and total != self.total_steps:
            self.total_steps = int(total)
            self.store.update_job(self.id, self.worker_id, total_steps=self.total_steps)
        if self.first_step is None:
            self.first_step, self.started = self.step, time.time()
        elif self.total_steps and self.step > self.first_step:  # steps still to go at this attempt's pace
            rate = (time.time() - self.started) / (self.step - self.first_step)
            self.store.update_job(self.id, self.worker_id,
                                  estimated_finish=int(time.time() + rate * (self.total_steps - self.step)))

    def _metrics(self, e: dict, names: dict[str, str], prefix: str) -> dict[str, Any]:
        data: dict[str, Any] = {"step": int(e["step"]), "total_steps": self.total_steps}
        for k, v in e.items():
            if k in SKIP or not isinstance(v, (int, float)) or isinstance(v, bool):
                continue
            data[names.get(k, prefix + k)] = v
        return data

    # ---- checkpoints --------------------------------------------------------------------------------

    def sync_checkpoints(self) -> None:
        """One row per checkpoint folder on disk, with the metrics logged up to its step (rows of
        pruned folders go): the same rows whether the run went straight through or was resumed."""
        folder = self.run_dir / "checkpoints"
        on_disk = {int(p.name.split("-")[1]): p for p in folder.glob("step-*")} if folder.is_dir() else {}
        rows = {r["step"] for r in self.store.list_checkpoints(self.id, limit=10_000)[0]}
        self.store.delete_checkpoints(self.id, sorted(rows - set(on_disk)))
        if not on_disk:
            return
        history = _read_metrics(self.run_dir / "metrics.jsonl")
        for step, path in sorted(on_disk.items()):
            if step not in rows:
                try:
                    self._export_adapter(path)
                except Exception as e:  # noqa: BLE001 - a serving copy failed; the training checkpoint is whole
                    self.message(f"warning: checkpoint step {step} was not exported as a peft adapter "
                                 f"({type(e).__name__}: {e}); its training checkpoint is kept", "warn")
                self.store.add_checkpoint(self.id, step, checkpoint_metrics(history, step),
                                          str(path.relative_to(self.data_dir)), jobmod.checkpoint_name(self.model_name, step))
                self.message(f"Checkpoint created at step {step}")

    def _export_adapter(self, step_dir: Path) -> None:
        """A peft run's checkpoint as a peft adapter folder (step-N/adapter), so the step can be served
        and downloaded like the final model. Other methods keep the training checkpoint only."""
        from tunesmith.methods import saved_as
        from tunesmith.tasks import get_task

        cfg = self.cfg
        if cfg is None or saved_as(cfg.method.name) != "adapter" or get_task(cfg.task).head is not None:
            return
        if (step_dir / "adapter" / "adapter_config.json").is_file():
            return
        from tunesmith.methods import apply_method
        from tunesmith.models.load import load_model, load_tokenizer, resolve_model_path
        from tunesmith.train import checkpoint as ckpt
        from tunesmith.utils import atomic_folder

        base = resolve_model_path(cfg.model.name_or_path)
        tok = load_tokenizer(base, cfg.model.trust_remote_code)
        # Building the adapter draws its init from the global RNGs that training's dropout and
        # shuffling use: put them back, or a run that exports would not match one resumed past it.
        rng = ckpt.rng_state()
        try:
            model = load_model(base, cfg.task, None, cfg.model.trust_remote_code, tok.pad_token_id)
            model = apply_method(model, cfg.method, cfg.task, tokenizer_path=base)
        finally:
            ckpt.set_rng_state(rng)
        ckpt.load_weights(step_dir, model)
        with atomic_folder(step_dir / "adapter") as tmp:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            conf = json.loads((tmp / "adapter_config.json").read_text())
            conf["base_model_name_or_path"] = cfg.model.name_or_path
            (tmp / "adapter_config.json").write_text(json.dumps(conf, indent=2, sort_keys=True))

    # ---- the attempt ----------------------------------------------------------------------------------

    def prepare(self) -> bool:
        """Build the config; decide fresh start or resume, forgetting what a lost attempt wrote past
        the checkpoint it resumes from. Returns resume."""
        from tunesmith.train import checkpoint as ckpt

        cfg = jobmod.run_config(self.store, self.job, self.data_dir)
        self._merge_ft_base(cfg)
        last = ckpt.latest_checkpoint(self.run_dir) if self.run_dir.is_dir() else None
        resume_step = int(last.name.split("-")[1]) if last is not None else 0
        if last is None:
            # a first attempt, or one that died before its first checkpoint: start over
            cfg = cfg.model_copy(update={"output": cfg.output.model_copy(update={"overwrite": True})})
        self.cfg = cfg
        self.store.rewind(self.id, resume_step)
        self.step = resume_step
        rows, _ = self.store.list_events(self.id, limit=100_000)
        self.seen_messages = {r["message"] for r in rows if r["type"] == "message"}
        self.store.update_job(self.id, self.worker_id, run_dir=jobmod.run_dir_of(self.job))
        if last is not None:
            self.sync_checkpoints()  # the checkpoint the lost attempt saved but had no time to record
            self.store.add_event(self.id, "info", f"Resuming from the checkpoint at step {resume_step} "
                                 f"(attempt {self.job['attempts']})", step=resume_step)
        return last is not None

    def _merge_ft_base(self, cfg) -> None:
        """An ft: base that saved an adapter is merged into a whole model once (runs/<parent>/merged)."""
        base = Path(cfg.model.name_or_path)
        if "job" not in self.job["tunesmith"]["base"] or base.exists():
            return
        from tunesmith.adapters import merge

        self.message(f"merging the base fine-tuned model {self.job['model']} into a full model (once)")
        try:
            merge(base.parent, base)
        except TunesmithError:
            if not (base / "config.json").is_file():  # another job merged it meanwhile: fine
                raise

    def succeed(self, result) -> None:
        fid = "file-" + self.id.removeprefix("ftjob-")[-24:]  # one results file per job, even if re-run
        data = metrics_csv(_read_metrics(self.run_dir / "metrics.jsonl")).encode()
        path = self.data_dir / "files" / f"{fid}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{fid}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        if self.store.get_file(self.job["project_id"], fid) is None:
            self.store.add_file(self.job["project_id"], "step_metrics.csv", "fine-tune-results", len(data),
                                f"files/{fid}.csv", id=fid, status="processed")
        self.message(f"New fine-tuned model created: {self.model_name}")
        self.message("The job has successfully completed")
        self.store.finish(self.id, self.worker_id, "succeeded", fine_tuned_model=self.model_name, result_files=[fid],
                          trained_tokens=trained_tokens(self), run_dir=jobmod.run_dir_of(self.job))

    def stopped(self) -> None:
        """train() stopped on our cancel event: the job's `requested` says why."""
        job = self.store.job(self.id) or {}
        requested = job.get("requested")
        if requested == "cancel":
            self.message("Fine-tuning job cancelled")
            self.store.finish(self.id, self.worker_id, "cancelled")
        elif requested == "pause":
            self.message(f"Fine-tuning job paused at step {self.step}; resume continues from there")
            self.store.finish(self.id, self.worker_id, "paused")
        else:  # the worker is shutting down: back to the queue, resumed by the next worker
            self.message(f"Worker {self.worker_id} stopped at step {self.step}; the job goes back to the queue")
            # a hand-over, not a lost worker: it does not count towards the worker's MAX_ATTEMPTS
            self.store.finish(self.id, self.worker_id, "queued", attempts=max(self.job["attempts"] - 1, 0))

    def fail(self, code: str, message: str, param: str | None = None) -> None:
        self.store.add_event(self.id, "error", message, step=self.step)
        self.store.finish(self.id, self.worker_id, "failed", error={"code": code, "message": message, "param": param})


def run(store: Store, job_id: str, data_dir: Path, worker_id: str, cancel: threading.Event) -> int:
    """Run one attempt; the job ends in its final state here unless this process dies."""
    job = store.job(job_id)
    if job is None or job["worker_id"] != worker_id or job["status"] != "running":
        print(f"job {job_id} is not held by {worker_id}; nothing to do", file=sys.stderr)
        return 0
    jr = JobRun(store, job, data_dir, worker_id)
    try:
        resume = jr.prepare()
        from tunesmith.train import train

        result = train(jr.cfg, resume=resume, on_event=jr.on_event, cancel=cancel)
        jr.sync_checkpoints()
        jr.succeed(result)
    except TrainingCancelled:
        jr.stopped()
    except DataError as e:
        jr.fail("invalid_training_file", str(e).replace(str(data_dir) + os.sep, ""), "training_file")
    except (ConfigError, StoreError, TunesmithError) as e:
        jr.fail(getattr(e, "code", None) or "invalid_config", str(e).replace(str(data_dir) + os.sep, ""),
                getattr(e, "param", None))
    except Exception as e:  # noqa: BLE001 - a training bug fails this job (with its traceback in the log), not the worker
        traceback.print_exc()
        jr.fail("training_error", f"training failed: {type(e).__name__}: {e}")
    return 0


# ---- results ---------------------------------------------------------------------------------------

def _read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def checkpoint_metrics(history: list[dict], step: int) -> dict[str, Any]:
    """OpenAI's checkpoint metrics at `step`: the last training row and the evaluation at or before it."""
    out: dict[str, Any] = {"step": step}
    train = [r for r in history if r["kind"] == "train" and r["step"] <= step]
    evals = [r for r in history if r["kind"] == "eval" and r["step"] <= step and "loss" in r]
    if train:
        out |= {TRAIN_KEYS.get(k, "train_" + k): v for k, v in train[-1].items()
                if k in ("loss", "token_accuracy", "accuracy")}
    if evals:
        e = evals[-1]
        out |= {"valid_loss": e["loss"], "full_valid_loss": e["loss"]}
        for k in ("token_accuracy", "accuracy"):
            if k in e:
                name = "mean_token_accuracy" if k == "token_accuracy" else "accuracy"
                out |= {f"valid_{name}": e[k], f"full_valid_{name}": e[k]}
    return out


def metrics_csv(history: list[dict]) -> str:
    """The job's result file: one row per logged step (OpenAI's step_metrics.csv), validation
    columns filled at the steps that evaluated."""
    by_step: dict[int, dict] = {}
    for r in history:
        row = by_step.setdefault(r["step"], {"step": r["step"]})
        names, prefix = (TRAIN_KEYS, "train_") if r["kind"] == "train" else (EVAL_KEYS, "valid_")
        for k, v in r.items():
            if k not in SKIP and isinstance(v, (int, float)) and not isinstance(v, bool):
                row[names.get(k, prefix + k)] = v
    cols = ["step"] + sorted({k for r in by_step.values() for k in r} - {"step"})
    buf = io.StringIO()
    w = csv.DictWriter(buf, cols, lineterminator="\n")
    w.writeheader()
    for step in sorted(by_step):
        w.writerow(by_step[step])
    return buf.getvalue()


def trained_tokens(jr: JobRun) -> int | None:
    """Tokens of the training file times the epochs trained (OpenAI's billable tokens), counted with
    the run's tokenizer for OpenAI-format files; None when no count is to be had."""
    row = jr.store.get_file(jr.job["project_id"], jr.job["training_file"]) or {}
    info = row.get("info") or {}
    history = [r for r in _read_metrics(jr.run_dir / "metrics.jsonl") if r["kind"] == "train"]
    epochs = history[-1]["epoch"] if history else None
    tokens = info.get("n_tokens")
    if tokens is None and str(info.get("format", "")).startswith("openai_"):
        from tunesmith.data.openai_format import validate_file
        from tunesmith.models.load import load_tokenizer

        saved = next((jr.run_dir / d for d in ("adapter", "model") if (jr.run_dir / d).is_dir()), None)
        if saved is not None:
            kind = info["format"].removeprefix("openai_")
            tokens = validate_file(jr.data_dir / row["path"], kind, load_tokenizer(str(saved))).tokens
    return round(tokens * epochs) if tokens is not None and epochs is not None else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tunesmith.service.runner", description=__doc__.split("\n")[0])
    p.add_argument("job_id")
    p.add_argument("--db", default=None, help="database URL (default: SQLite in the data dir)")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--worker-id", required=True)
    p.add_argument("--parent-pid", type=int, default=None, help="die when this process does (the worker)")
    a = p.parse_args(argv)
    if a.parent_pid:
        _die_with_parent(a.parent_pid)
    cancel = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: cancel.set())
    store = Store(a.db, Path(a.data_dir))
    try:
        return run(store, a.job_id, Path(a.data_dir).absolute(), a.worker_id, cancel)
    finally:
        store.close()


if __name__ == "__main__":
    sys.exit(main())
