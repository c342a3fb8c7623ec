"""`run_search()`: a config and a space in, a finished study out (table, plots, best config,
optionally the best retrained on train+validation and scored on test).

Read top to bottom: check everything (config, space, storage) before any trial; take trial
slots until none is left (each trial a child process, see runner.py); write what was found.
"""
from __future__ import annotations

import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import optuna
from optuna.trial import TrialState

from tunesmith.config import RunConfig, check_inputs_exist, load_config, parse_overrides
from tunesmith.errors import ConfigError, TrainingCancelled, TunesmithError
from tunesmith.search import objectives, report
from tunesmith.search.runner import TrialRun, run_trial, start_server
from tunesmith.search.space import Space, decode_params, default_space, load_space
from tunesmith.search.study import (Heartbeat, describe_storage, interrupted, open_storage, open_study,
                                    recover_dead_trials, storage_of, take_slot)
from tunesmith.utils import current_rss_mb

Sampler = Literal["tpe", "random", "grid"]
Pruner = Literal["median", "asha", "none"]
EventFn = Callable[[dict[str, Any]], None]
TPE_STARTUP = 5  # random trials before TPE models the results (optuna's 10 would be all of a short search)
MEDIAN_STARTUP = 3  # trials that finish before the median pruner stops any (optuna's default: 5)
ASHA_REDUCTION = 3  # successive halving keeps the top third at each rung (evaluations 1, 3, 9, ...)


@dataclass
class SearchResult:
    study: str
    search_dir: Path
    storage: str
    metric: str
    direction: str
    table: list[dict[str, Any]]
    best: dict[str, Any] | None  # trial, value, params, run_dir, test_value (one objective)
    best_config: Path | None
    counts: dict[str, int]  # complete / pruned / fail, over the trials that count
    steps: int  # optimizer steps trained by all trials (compute spent)
    seconds: float  # wall-clock of all trial processes
    plots: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    retrain: dict[str, Any] | None = None  # the retrained run's summary (test metrics)
    front: list[dict[str, Any]] = field(default_factory=list)  # with --also: the Pareto front's trials, each with its config


def run_search(config: str | Path | dict, space: str | Path | Space | None = None, *, trials: int | None = None,
               parallel: int = 1, storage: str | None = None, study: str | None = None, sampler: Sampler = "tpe",
               pruner: Pruner = "median", budget_steps: int | None = None, seed: int | None = None,
               retrain: bool = False, out: str | Path | None = None, overrides: dict | list[str] | None = None,
               threads: int | None = None, also: list[str] | None = None, on_event: EventFn | None = None,
               cancel: threading.Event | None = None, echo: bool = False) -> SearchResult:
    """Search hyperparameters of a run config.

    Args:
        config: the base run config (YAML path or dict); `overrides` apply to it first.
        space: a space YAML, a Space, or None for the built-in space of the config's method.
        trials: how many trials the study holds (a grid: its size, the default).
        parallel: trials run at once by this process (each a child process).
        storage: None (a SQLite file in the search folder), sqlite:///FILE, postgresql://..., FILE.log.
        study: the study's name (default: '<output.name>-search'); the same name continues a study.
        budget_steps: stop starting trials once the study's trials have trained this many steps.
        seed: the sampler's seed (None: random; give each process of a shared study its own).
        retrain: train the best trial's config on train+validation and score it on test.
        out: the search folder (default: the config's output.dir with the study's name).
        threads: torch threads per trial (default: the cores divided among `parallel` trials).
        also: further objectives (search/objectives.py: forgetting, cost): the study becomes
            multi-objective and reports its Pareto front; Optuna cannot prune such a study.
        on_event: called with {"kind": "message", "text"}, {"kind": "trial", "trial", "state", ...} as a
            trial starts and ends, and each trial's validation rows ({"kind": "eval", "trial", ...}).
        cancel: when set, the running trials stop at their next step and are queued again.
        echo: print progress (the CLI).
    Raises:
        ConfigError / SpaceError / TunesmithError for bad input, before any trial runs.
    """
    say = _sayer(on_event, echo)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own lines say what each trial did
    base_ov = parse_overrides(overrides) if isinstance(overrides, list) else dict(overrides or {})
    cfg = load_config(config, base_ov)
    check_inputs_exist(cfg)
    if not (cfg.data.validation or cfg.data.val_size) or cfg.data.train_on_validation:
        raise ConfigError("search: the trials are compared on validation data: give data.validation or data.val_size "
                          "(and leave data.train_on_validation off)")
    if parallel < 1:
        raise TunesmithError(f"--parallel: expected 1 or more, got {parallel}")
    metric, greater = cfg.best_metric()
    extra = objectives.check(cfg, also or [])
    directions = ["maximize" if g else "minimize" for g in (greater, *(g for _, g in extra))]
    direction = directions[0]
    if extra and retrain:
        raise ConfigError("--retrain takes the one best trial; with --also the search finds a front of them: "
                          "train the one you choose (pareto/trial-N.yaml) on train+validation yourself")
    if extra and pruner != "none":
        say(f"pruner {pruner} off: Optuna cannot prune a search with several objectives")
        pruner = "none"
    space = space if isinstance(space, Space) else load_space(space) if space else default_space(cfg.method.name)
    space.check(config, base_ov)
    start_server()  # the trial processes' imports (~15 s on a busy 2-core machine) while we set up
    base = cfg.model_dump(mode="json")
    slots = _slots(space, base, sampler, trials)
    name = study or f"{cfg.output.name}-search"
    search_dir = Path(out) if out else Path(cfg.output.dir.format(name=name))
    store = open_storage(storage, search_dir)
    setup = {"config": {k: v for k, v in base.items() if k != "output"}, "space": space.as_dict()}
    st = open_study(store, name, directions, _sampler(sampler, seed), _pruner(pruner), slots, setup,
                    {"sampler": sampler, "pruner": pruner})
    search_dir.mkdir(parents=True, exist_ok=True)
    say(f"search {name}: {len(slots)} trials ({sampler}, pruner {pruner}) over {', '.join(space.names())} "
        f"from {space.source}; objective: validation {metric} ({direction})"
        + "".join(f", {n} ({d})" for (n, _), d in zip(extra, directions[1:])) + f"; storage {describe_storage(store)}; "
        f"folder {search_dir}")

    job = _Job(config, base_ov, base, space, st, search_dir, metric, greater, sampler == "grid", budget_steps,
               threads or max(1, (os.cpu_count() or 1) // parallel), cancel or threading.Event(), say,
               on_event or (lambda e: None), [n for n, _ in extra])
    # Other processes of a shared study may still be running trials: every process's table, best
    # config and retrain are of the whole study, so none finishes before the study does; a trial
    # whose process died meanwhile is queued again, and whoever is still here runs it.
    while True:
        job.run(parallel)
        _wait_for_others(st, say, job.cancel)
        spent = budget_steps is not None and _spent(st)[0] >= budget_steps
        if job.cancel.is_set() or spent or not st.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            break
    result = _finish(job, config, cfg, name, store, direction)
    if retrain and result.best is not None and not job.cancel.is_set():
        result.retrain = _retrain(job, result)
    if job.cancel.is_set():
        raise TrainingCancelled(f"the running trials were stopped and queued again; rerun the same command to "
                                f"continue study {name} ({search_dir / 'results.md'} has the trials so far)")
    return result


def _sayer(on_event: EventFn | None, echo: bool) -> Callable[[str], None]:
    def say(text: str) -> None:
        if echo:
            print(text, flush=True)
        if on_event:
            on_event({"kind": "message", "text": text})
    return say


def _slots(space: Space, base: dict[str, Any], sampler: Sampler, trials: int | None) -> list[dict[str, Any]]:
    """The study's trials as fixed params: grid points, or N empty slots for the sampler to fill."""
    if sampler == "grid":
        points = space.grid(base)
        if trials is not None and trials != len(points):
            raise TunesmithError(f"--trials {trials}: the grid has {len(points)} points; leave --trials out "
                                 f"or give {len(points)}")
        return points
    if sampler not in ("tpe", "random"):
        raise TunesmithError(f"--sampler: expected tpe, random or grid, got {sampler!r}")
    if trials is None or trials < 1:
        raise TunesmithError("--trials: how many trials to run (1 or more)")
    return [{} for _ in range(trials)]


def _sampler(kind: Sampler, seed: int | None) -> optuna.samplers.BaseSampler:
    if kind != "tpe":  # a grid's trials carry their values; random is random
        return optuna.samplers.RandomSampler(seed=seed)
    # multivariate + group model parameters jointly and handle conditional ones; constant_liar
    # keeps parallel trials from all sampling the same point.
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=TPE_STARTUP, multivariate=True, group=True,
                                          constant_liar=True)


def _pruner(kind: Pruner) -> optuna.pruners.BasePruner:
    if kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=MEDIAN_STARTUP, n_warmup_steps=0)
    if kind == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=ASHA_REDUCTION)
    if kind == "none":
        return optuna.pruners.NopPruner()
    raise TunesmithError(f"--pruner: expected median, asha or none, got {kind!r}")


@dataclass
class _Job:
    """What the worker threads share."""

    config: str | Path | dict
    base_ov: dict[str, Any]
    base: dict[str, Any]
    space: Space
    study: optuna.Study
    search_dir: Path
    metric: str
    greater: bool
    grid: bool
    budget_steps: int | None
    threads: int
    cancel: threading.Event
    say: Callable[[str], None]
    emit: EventFn
    also: list[str]  # further objectives (empty: one objective, pruning as configured)
    errors: list[BaseException] = field(default_factory=list)

    def run(self, parallel: int) -> None:
        """Take and run trial slots on `parallel` threads until none is left (or the budget is spent)."""
        heartbeat = Heartbeat(storage_of(self.study)[0])
        workers = [threading.Thread(target=self._worker, args=(heartbeat,), name=f"search-{i}", daemon=True)
                   for i in range(parallel)]
        for w in workers:
            w.start()
        try:
            while any(w.is_alive() for w in workers):
                for w in workers:
                    w.join(0.5)
        except KeyboardInterrupt:  # the API caller's Ctrl-C: stop the trials at their next step, as the CLI does
            self.cancel.set()
            for w in workers:
                w.join()
        finally:
            heartbeat.close()
        if self.errors:
            raise self.errors[0]

    def _worker(self, heartbeat: Heartbeat) -> None:
        try:
            while not self.cancel.is_set() and not self.errors:
                for number in recover_dead_trials(self.study):
                    self.say(f"trial {number}: its search process is gone; marked failed and queued again")
                if self.budget_steps is not None and _spent(self.study)[0] >= self.budget_steps:
                    self.say(f"budget of {self.budget_steps} steps spent; no new trials")
                    return
                trial_id = take_slot(self.study)
                if trial_id is None:
                    return
                heartbeat.add(trial_id)
                try:
                    self._trial(optuna.Trial(self.study, trial_id))
                finally:
                    heartbeat.discard(trial_id)
        except BaseException as e:  # handed to the main thread, which raises it
            self.errors.append(e)
            self.cancel.set()

    def _trial(self, trial: optuna.Trial) -> None:
        """Run one trial and tell the study how it ended (a failure of ours still ends the trial)."""
        try:
            params = self.space.suggest(trial, self.base, grid=self.grid)
            run_dir = self.search_dir / "trials" / f"trial-{trial.number:04d}"
            ov = {**self.base_ov, **params, "output.dir": str(run_dir.parent / "{name}"), "output.name": run_dir.name,
                  "output.overwrite": True, "eval.before": False}  # the base model's score is the same for all trials
            trial.set_user_attr("run_dir", str(run_dir))
            shown = ", ".join(f"{k}={_short(v)}" for k, v in params.items())
            try:
                load_config(self.config, ov)
            except ConfigError as e:
                self._end(trial, TrialRun("invalid", f"invalid config: {' '.join(str(e).split())}"), shown)
                return
            self.say(f"trial {trial.number}: {shown}")

            def started(pid: int) -> None:
                trial.set_user_attr("child_pid", pid)
                self.emit({"kind": "trial", "trial": trial.number, "state": "running", "pid": pid, "params": params})

            run = run_trial(self.config, ov, run_dir.with_suffix(".log"), metric=self.metric, greater=self.greater,
                            report=None if self.also else lambda value, k: _report(trial, value, k),
                            cancel=self.cancel, threads=self.threads,
                            on_start=started, on_eval=lambda row: self.emit({**row, "trial": trial.number}))
            self._end(trial, run, shown)
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # the trial's model is saved beside them
        except BaseException as e:
            if storage_of(self.study)[0].get_trial(trial._trial_id).state == TrialState.RUNNING:
                trial.set_user_attr("detail", f"search error: {type(e).__name__}: {e}")
                self.study.tell(trial, state=TrialState.FAIL)
            raise

    def _end(self, trial: optuna.Trial, run: TrialRun, shown: str) -> None:
        s = run.summary or {}
        for key, value in (("steps", run.steps), ("seconds", round(run.seconds, 1)), ("detail", run.detail),
                           ("best_step", s.get("best_step")), ("search_rss_mb", current_rss_mb()),
                           ("evals", [{k: r.get(k) for k in ("step", "epoch", self.metric)} for r in run.evals]),
                           ("test_value", s.get("final_value") if s.get("final_split") == "test" else None)):
            trial.set_user_attr(key, value)
        if run.outcome == "complete" and run.value is None:
            run.outcome, run.detail = "crashed", "no validation metric in the run"
            trial.set_user_attr("detail", run.detail)
        more = objectives.values(s, self.also) if run.outcome == "complete" else []
        if isinstance(more, str):
            run.outcome, run.detail = "crashed", more
            trial.set_user_attr("detail", run.detail)
        if run.outcome == "interrupted":
            interrupted(self.study, trial._trial_id, run.detail)
        elif run.outcome == "complete":
            self.study.tell(trial, [run.value, *more] if self.also else run.value)
        elif run.outcome == "pruned":
            self.study.tell(trial, state=TrialState.PRUNED)
        else:
            self.study.tell(trial, state=TrialState.FAIL)
        self.emit({"kind": "trial", "trial": trial.number, "state": run.outcome, "value": run.value,
                   "steps": run.steps, "detail": run.detail})
        value = f"{self.metric} {run.value:.4f}" if run.value is not None else ""
        self.say(f"trial {trial.number}: {run.outcome} {value} ({run.steps} steps, {run.seconds:.0f} s)"
                 + (f": {run.detail}" if run.detail and run.outcome != "complete" else ""))


def _report(trial: optuna.Trial, value: float, evaluation: int) -> bool:
    trial.report(value, evaluation)
    return trial.should_prune()


def _short(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _spent(study: optuna.Study) -> tuple[int, float]:
    """Optimizer steps and trial-process seconds of the study's finished trials."""
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL))
    return (sum(t.user_attrs.get("steps") or 0 for t in done),
            sum(t.user_attrs.get("seconds") or 0.0 for t in done))


def _wait_for_others(study: optuna.Study, say: Callable[[str], None], cancel: threading.Event) -> None:
    """Until no trial of the study runs (other processes' included; dead ones are queued again)."""
    told = False
    while not cancel.is_set():
        recover_dead_trials(study)
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if not running:
            return
        if not told:
            say(f"waiting for {len(running)} trial(s) of other processes to finish")
            told = True
        time.sleep(5)


def _finish(job: _Job, config, cfg: RunConfig, name: str, store, direction: str) -> SearchResult:
    """The table, the plots and the best config, from every trial in the study (all processes')."""
    st, metric = job.study, job.metric
    table = report.rows(st, metric, job.also)
    trials = st.get_trials(deepcopy=False)
    kept = report.counted(trials)
    counts = {s: sum(t.state.name.lower() == s for t in kept) for s in ("complete", "pruned", "fail", "running")}
    steps, seconds = _spent(st)
    best, best_path, plots, notes, front = None, None, [], [], []
    if counts["complete"] and job.also:
        front = _write_front(job, config, name)
        plots, notes = report.plot(st, job.search_dir, metric, job.also)
    elif counts["complete"]:
        bt = st.best_trial
        params = decode_params(bt.params)
        best = {"trial": bt.number, "value": bt.value, "params": params, "run_dir": bt.user_attrs.get("run_dir"),
                "test_value": bt.user_attrs.get("test_value"), "best_step": bt.user_attrs.get("best_step"),
                "evals": bt.user_attrs.get("evals", [])}
        best_cfg = load_config(config, {**job.base_ov, **params})
        dump = best_cfg.model_dump(mode="json")
        dump["output"] = {**dump["output"], "name": f"{name}-best", "overwrite": False}
        best_path = job.search_dir / "best.yaml"
        report.write_best_config(dump, best_path, [
            f"tunesmith train {best_path}",
            f"The best trial ({bt.number}) of search {name}: validation {metric} {bt.value:.4f} at step "
            f"{bt.user_attrs.get('best_step')}; {', '.join(f'{k}={_short(v)}' for k, v in params.items())}."])
        plots, notes = report.plot(st, job.search_dir, metric)
    header = (f"# search {name}\n\n{len(kept)} trials: {counts['complete']} complete, {counts['pruned']} pruned, "
              f"{counts['fail']} failed" + (f", {counts['running']} running" if counts["running"] else "")
              + f"; {steps} training steps, {seconds:.0f} s of trial processes. Objective: validation {metric} "
              f"({direction}), the run's keep-best value" + "".join(f"; {n} ({d.name.lower()})" for n, d in
                                                                   zip(job.also, st.directions[1:])) + ".")
    if best:
        header += f"\n\nBest: trial {best['trial']}, {metric} {best['value']:.4f}; config {best_path}"
    if front:
        header += (f"\n\nPareto front ({len(front)} trials no other trial beats on every objective; column `pareto`): "
                   + "; ".join(f"trial {f['trial']}: " + ", ".join(f"{k} {v:.4g}" for k, v in f["values"].items())
                               + f" ({f['config']})" for f in front))
    report.write_tables(table, job.search_dir, header)
    job.say("\n" + header.removeprefix("# ") + "\n\n" + report.markdown(table) + "\n" + "\n".join(notes)
            + f"\nresults: {job.search_dir / 'results.md'}")
    return SearchResult(name, job.search_dir, describe_storage(store), metric, direction, table, best, best_path,
                        counts, steps, seconds, plots, notes, front=front)


def _write_front(job: _Job, config, name: str) -> list[dict[str, Any]]:
    """pareto/trial-N.yaml for each trial of the Pareto front (a fresh folder: a trial that left the
    front as the study grew leaves no stale config behind)."""
    folder = job.search_dir / "pareto"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    front = []
    for t in sorted(job.study.best_trials, key=lambda t: t.number):
        params = decode_params(t.params)
        dump = load_config(config, {**job.base_ov, **params}).model_dump(mode="json")
        dump["output"] = {**dump["output"], "name": f"{name}-trial-{t.number}", "overwrite": False}
        path = folder / f"trial-{t.number:04d}.yaml"
        values = dict(zip([job.metric, *job.also], t.values))
        report.write_best_config(dump, path, [
            f"tunesmith train {path}",
            f"Trial {t.number} of search {name}, on its Pareto front: "
            + ", ".join(f"{k} {v:.4g}" for k, v in values.items())
            + f"; {', '.join(f'{k}={_short(v)}' for k, v in params.items())}."])
        front.append({"trial": t.number, "values": values, "params": params, "config": path,
                      "run_dir": t.user_attrs.get("run_dir")})
    return front


def _retrain(job: _Job, result: SearchResult) -> dict[str, Any]:
    """The best config trained on train+validation for as long as its best checkpoint had trained,
    then scored on the test split."""
    best = result.best
    cfg = load_config(result.best_config)
    at = next((r for r in best["evals"] if r.get("step") == best["best_step"]), None)
    length = ({"train.max_steps": best["best_step"]} if cfg.train.max_steps
              else {"train.epochs": at["epoch"]} if at and at.get("epoch") else {})
    ov = {"data.train_on_validation": True, "train.early_stopping_patience": None, **length,
          "output.dir": str(job.search_dir / "{name}"), "output.name": "retrain", "output.overwrite": True}
    job.say(f"retraining the best config on train+validation ({', '.join(f'{k}={v}' for k, v in length.items())}) ...")
    run = run_trial(str(result.best_config), ov, job.search_dir / "retrain.log", metric=job.metric,
                    greater=job.greater, cancel=job.cancel, threads=job.threads)
    if run.outcome != "complete":
        raise TunesmithError(f"the retrain did not finish: {run.detail} (log: {job.search_dir / 'retrain.log'})")
    s = run.summary
    job.say(f"retrained: {s['final_split']} {job.metric} {s['final_value']:.4f} (run folder {run.run_dir})")
    return {**s, "run_dir": run.run_dir}
