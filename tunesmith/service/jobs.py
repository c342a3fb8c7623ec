"""Fine-tuning jobs: an OpenAI job-create request in, a job row and a tunesmith RunConfig out.

The request's OpenAI part maps onto tunesmith's config:
  method.type supervised -> task sft, dpo -> task dpo (reinforcement: refused, not faked);
  n_epochs -> train.epochs, batch_size -> train.batch_size, beta -> pref.beta,
  learning_rate_multiplier -> train.lr = multiplier x tunesmith's default lr for the method.
"auto" values are resolved when the job is made, by OpenAI's published rules, and echoed back
(AUTO_RULES below says where each comes from). Everything else tunesmith can do rides in
`extra_body={"tunesmith": {...}}`: any RunConfig section (task, method, train, data, eval, pref),
validated by tunesmith.config with its own messages, each error's `param` being the field
(`tunesmith.method.r`).

The job row keeps no filesystem path from the request: `model` must be a builtin: alias, a model
the service was started with (--model NAME=PATH), a folder under DATA_DIR/models, or an ft: model
of the same project; files are ids of the project's processed uploads. Paths are made on the
worker, under its data dir, when the job runs (run_config).
"""
from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

from tunesmith import assets
from tunesmith.config import DEFAULT_LR, RunConfig, load_config, task_facts
from tunesmith.errors import ConfigError
from tunesmith.service.store import Store, StoreError, new_id

METHODS = {"supervised": "sft", "dpo": "dpo"}  # OpenAI method.type -> tunesmith task
FORMATS = {"supervised": 'the chat format ({"messages": [...]})',
           "dpo": "the DPO format (input / preferred_output / non_preferred_output)"}
HYPERPARAMETERS = {"supervised": ("n_epochs", "batch_size", "learning_rate_multiplier"),
                   "dpo": ("n_epochs", "batch_size", "learning_rate_multiplier", "beta")}
# Request fields that would name a path or run code on the service's machine.
FORBIDDEN = {"output": "the service chooses the run folder",
             "model.name_or_path": "give the base model as the request's `model`",
             "model.trust_remote_code": "the service runs no code from model folders",
             "data.train": "give the data as `training_file`", "data.validation": "give it as `validation_file`",
             "data.test": "upload it and give it as `validation_file`",
             "pref.reward_model": "not available through the service", "pref.reward_fn": "runs code: not "
             "available through the service", "pref.tax_data": "not available through the service"}
SECTIONS = ("task", "model", "data", "method", "train", "eval", "pref")
# What the service sets unless the request's tunesmith section says otherwise: OpenAI's behaviour
# (all of the training file trains, the last step is the model, 3 checkpoints kept) and no extra
# generation passes a job pays for without asking.
SERVICE_DEFAULTS = {"data.val_size": 0, "data.test_size": 0, "eval.before": False, "eval.generate_metrics": False,
                    "eval.num_samples": 0, "train.load_best": False, "train.keep_checkpoints": 3}
SUFFIX = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

# "auto" hyperparameters, by the rules OpenAI has published:
# - n_epochs: OpenAI cookbook "Data preparation and analysis for chat model fine-tuning": 3 epochs,
#   raised so that epochs x examples reaches 100 (at most 25 epochs), lowered so that it stays under
#   25,000 (at least 1).
# - batch_size: the fine-tunes API reference: "~0.2% of the number of examples in the training set,
#   capped at 256" (and at least 1).
# - learning_rate_multiplier: OpenAI's multiplier scales the base model's pretraining learning rate
#   (0.05-0.2 by batch size in the legacy API); ours scales tunesmith's default learning rate for
#   the method (config.DEFAULT_LR, itself measured), so "auto" is 1.0.
# - beta (DPO): 0.1, tunesmith's pref.beta default and the DPO paper's usual value.
TARGET_EPOCHS, MIN_TARGET_EXAMPLES, MAX_TARGET_EXAMPLES, MIN_EPOCHS, MAX_EPOCHS = 3, 100, 25_000, 1, 25


def auto_epochs(n_examples: int) -> int:
    n = max(n_examples, 1)
    if n * TARGET_EPOCHS < MIN_TARGET_EXAMPLES:
        return min(MAX_EPOCHS, MIN_TARGET_EXAMPLES // n)
    if n * TARGET_EPOCHS > MAX_TARGET_EXAMPLES:
        return max(MIN_EPOCHS, MAX_TARGET_EXAMPLES // n)
    return TARGET_EPOCHS


def auto_batch_size(n_examples: int) -> int:
    return max(1, min(256, round(0.002 * n_examples)))


def _fail(message: str, param: str | None, code: str = "invalid_request") -> StoreError:
    return StoreError(message, code=code, param=param)


# ---- create ---------------------------------------------------------------------------------------

def create_job(store: Store, project_id: str, body: dict[str, Any], data_dir: Path,
               models: dict[str, str] | None = None, *, validate: bool = True) -> dict:
    """Check an OpenAI job-create body, resolve its hyperparameters and config, insert the job in
    status `validating_files`, and (with `validate`) validate its files (validate_job).

    Args:
        body: the request's JSON, with the optional "tunesmith" key of extra_body.
        models: NAME -> PATH of the models the service was started with (--model NAME=PATH).
        validate: validate the files now; False leaves the job in validating_files for the caller
            to validate (the API answers first and validates in the background, as OpenAI does).
    Returns:
        The job row: status validating_files, or (validated) queued or failed.
    Raises:
        StoreError with the OpenAI `param` of the first problem (tunesmith.<field> for config ones).
    """
    cols = build_job(store, project_id, body, data_dir, models or {})
    job_id = new_id("ftjob-")
    job = store.add_job(project_id, messages=(
        f"Created fine-tuning job: {job_id}", f"Validating training file: {cols['training_file']}"
        + (f" and validation file: {cols['validation_file']}" if cols.get("validation_file") else "")),
        **cols | {"id": job_id, "status": "validating_files"})
    return validate_job(store, job, data_dir) if validate else job


def validate_job(store: Store, job: dict, data_dir: Path) -> dict:
    """validating_files -> queued, or -> failed with `error` {code, message, param}: the job's files
    read as its own config reads them (task, columns, labels), which the upload's validation could
    not do (it knew the file, not the job). Each problem names its file and line.

    A job cancelled meanwhile stays cancelled (pause waits for the validation's end: see
    Store.request). Returns the job row after the move."""
    from tunesmith.data import load_records, resolve_labels
    from tunesmith.errors import TunesmithError
    from tunesmith.tasks import get_task

    error = None
    try:
        cfg = run_config(store, job, data_dir)
        for param, path in (("training_file", cfg.data.train), ("validation_file", cfg.data.validation)):
            if path is None:
                continue
            try:
                records, src = load_records(path, cfg.data)
                labels = resolve_labels(cfg, records, src)
                get_task(cfg.task).read(records, cfg, labels, labels or cfg.data.labels or src.get("labels"))
            except TunesmithError as e:
                error = {"code": f"invalid_{param}", "param": param,
                         "message": f"{param} {job[param]}: {_no_paths(str(e), data_dir)}"}
                break
    except StoreError as e:  # a file deleted since the job was made
        error = {"code": e.code, "param": e.param, "message": str(e)}
    row = store.end_validation(job["id"], error)
    if error is None:
        store.add_event(job["id"], "info", "Files validated, moving job to queued state")
    else:
        store.add_event(job["id"], "error", f"File validation failed: {error['message']}")
    return row


def _no_paths(message: str, data_dir: Path) -> str:
    """A data error's message with the service's folders left out (the client knows file ids)."""
    return message.replace(str(Path(data_dir).resolve()) + "/", "").replace(str(data_dir) + "/", "")


def build_job(store: Store, project_id: str, body: dict[str, Any], data_dir: Path,
              models: dict[str, str]) -> dict[str, Any]:
    """The job's columns for store.add_job (see create_job)."""
    if not isinstance(body, dict):
        raise _fail("the request body must be a JSON object", None)
    known = {"model", "training_file", "validation_file", "hyperparameters", "method", "suffix", "seed",
             "metadata", "integrations", "tunesmith"}
    for key in body:
        if key not in known:
            raise _fail(f"unknown parameter {key!r}", key, "unknown_parameter")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _fail("model: required, the name of a base model or an ft: model", "model")
    train_file = _file(store, project_id, body.get("training_file"), "training_file")
    val_file = _file(store, project_id, body.get("validation_file"), "validation_file") \
        if body.get("validation_file") is not None else None
    mtype, given, where = _method(body)
    extra = body.get("tunesmith") or {}
    if not isinstance(extra, dict):
        raise _fail("tunesmith: expected an object of tunesmith config sections", "tunesmith")
    extra = dict(extra)
    webhook = _webhook(extra.pop("webhook", None))
    task = extra.get("task", METHODS[mtype])
    if not isinstance(task, str):
        raise _fail("tunesmith.task: a task name", "tunesmith.task", "invalid_config")
    if "task" not in extra:  # with a task of its own the request vouches for the data shape; tunesmith checks it
        _check_fits(train_file, task, "training_file", mtype)
        if val_file is not None:
            _check_fits(val_file, task, "validation_file", mtype)
    base = resolve_model(store, project_id, model, data_dir, models)
    seed = body.get("seed")
    if seed is None:
        seed = random.randrange(2**31)
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**31:
        raise _fail("seed: an integer from 0 to 2147483647", "seed")
    n_examples = int((train_file.get("info") or {}).get("n_examples") or 0)
    sections, hyper = _config_sections(extra, task, mtype, given, where, n_examples, seed)
    # Validate now, with the real file and model, so a bad setting is a 400 and not a failed job.
    check_config(sections, base_path(base, data_dir, store), data_dir / train_file["path"],
                 data_dir / val_file["path"] if val_file else None)
    suffix = body.get("suffix")
    if suffix is not None and (not isinstance(suffix, str) or not SUFFIX.match(suffix)):
        raise _fail("suffix: up to 64 characters of letters, digits, '.', '_' and '-'", "suffix")
    return {"model": model, "training_file": train_file["id"], "validation_file": val_file["id"] if val_file else None,
            "method": {"type": mtype, mtype: {"hyperparameters": hyper}}, "hyperparameters": hyper,
            "tunesmith": {"config": sections, "base": base}, "suffix": suffix, "seed": seed,
            "metadata": _metadata(body.get("metadata")), "webhook": webhook,
            "result_files": [], "status": "queued"}


def _file(store: Store, project_id: str, file_id: Any, param: str) -> dict:
    if not isinstance(file_id, str) or not file_id:
        raise _fail(f"{param}: required, the id of an uploaded file", param)
    row = store.get_file(project_id, file_id)
    if row is None:
        raise _fail(f"{param}: no file {file_id!r}", param, "invalid_file")
    code = "invalid_training_file" if param == "training_file" else "invalid_validation_file"
    if row["purpose"] != "fine-tune":
        raise _fail(f"{param}: file {file_id} was uploaded with purpose {row['purpose']!r}, not 'fine-tune'", param, code)
    if row["status"] != "processed":
        why = f": {row['status_details']}" if row.get("status_details") else ""
        raise _fail(f"{param}: file {file_id} is {row['status']}, not processed{why}", param, code)
    return row


def _check_fits(row: dict, task: str, param: str, mtype: str) -> None:
    shape = (row.get("info") or {}).get("task")
    if shape is not None and shape != task:
        code = "invalid_training_file" if param == "training_file" else "invalid_validation_file"
        want = FORMATS[mtype] if METHODS[mtype] == task else f"{task} data"
        raise _fail(f"{param}: file {row['id']} holds {shape} data; method {mtype} needs {want}", param, code)


def _method(body: dict) -> tuple[str, dict, str]:
    """(method type, the hyperparameters as given) from `method` or the legacy top-level `hyperparameters`."""
    method = body.get("method")
    legacy = body.get("hyperparameters")
    if method is None:
        mtype, given, where = "supervised", legacy or {}, "hyperparameters"
    else:
        if not isinstance(method, dict) or not isinstance(method.get("type"), str):
            raise _fail("method: an object with a `type` (supervised or dpo)", "method.type")
        mtype = method["type"]
        if mtype == "reinforcement":
            raise _fail("method.type 'reinforcement' (reinforcement fine-tuning with graders) is not supported by "
                        "tunesmith; for reward-driven training use extra_body={'tunesmith': {'task': 'grpo', ...}} "
                        "with method.type supervised", "method.type", "unsupported_method")
        if mtype not in METHODS:
            raise _fail(f"method.type: {mtype!r} is not one of supervised, dpo", "method.type")
        section = method.get(mtype) or {}
        if not isinstance(section, dict):
            raise _fail(f"method.{mtype}: expected an object", f"method.{mtype}")
        given, where = section.get("hyperparameters") or {}, f"method.{mtype}.hyperparameters"
        if legacy:
            raise _fail("hyperparameters: give them in method.<type>.hyperparameters when `method` is set",
                        "hyperparameters")
    if not isinstance(given, dict):
        raise _fail(f"{where}: expected an object", where)
    for key in given:
        if key not in HYPERPARAMETERS[mtype]:
            raise _fail(f"{where}.{key}: not a {mtype} hyperparameter (those are "
                        f"{', '.join(HYPERPARAMETERS[mtype])})", f"{where}.{key}")
    checks = {"n_epochs": (int, 1, 50), "batch_size": (int, 1, 256), "learning_rate_multiplier": (float, 1e-6, 100),
              "beta": (float, 1e-6, 2)}
    for key, value in given.items():
        kind, lo, hi = checks[key]
        ok = value == "auto" or (isinstance(value, (int, float)) and not isinstance(value, bool)
                                 and (kind is float or float(value).is_integer()) and lo <= value <= hi)
        if not ok:
            what = "an integer" if kind is int else "a number"
            raise _fail(f"{where}.{key}: \"auto\" or {what} from {lo:g} to {hi:g}, got {value!r}", f"{where}.{key}")
    return mtype, given, where


def _config_sections(extra: dict, task: str, mtype: str, given: dict, where: str, n_examples: int,
                     seed: int) -> tuple[dict, dict]:
    """The tunesmith config sections (no paths) and the resolved OpenAI hyperparameters."""
    for key, value in extra.items():
        if key not in SECTIONS:
            raise _fail(f"tunesmith.{key}: not a config section the service takes (those are "
                        f"{', '.join(SECTIONS)})", f"tunesmith.{key}")
        if key != "task" and not isinstance(value, dict):
            raise _fail(f"tunesmith.{key}: expected an object of settings", f"tunesmith.{key}")
    for dotted, why in FORBIDDEN.items():
        section, _, field = dotted.partition(".")
        if section in extra and (not field or field in extra[section]):
            raise _fail(f"tunesmith.{dotted}: {why}", f"tunesmith.{dotted}")
    try:
        task_facts(task)
    except ConfigError as e:
        raise _fail(f"tunesmith.task: {e}", "tunesmith.task", "invalid_config") from None
    sections = {k: dict(v) if isinstance(v, dict) else v for k, v in extra.items()}
    sections["task"] = task
    for dotted, value in SERVICE_DEFAULTS.items():
        section, field = dotted.split(".")
        sections.setdefault(section, {}).setdefault(field, value)
    train = sections.setdefault("train", {})
    method_name = (sections.get("method") or {}).get("name", "lora")
    default_lr = DEFAULT_LR.get(method_name, DEFAULT_LR["*"])

    def pick(key: str, field: str, auto: Any, section: dict) -> Any:
        value = given.get(key, "auto")
        if value != "auto" and field in section:
            raise _fail(f"{where}.{key} and tunesmith.{'train' if section is train else 'pref'}.{field} both "
                        f"set it; give one", f"{where}.{key}")
        if field in section:  # tunesmith's own setting wins over "auto"
            return section[field]
        return auto if value == "auto" else value

    n_epochs = pick("n_epochs", "epochs", auto_epochs(n_examples), train)
    batch_size = pick("batch_size", "batch_size", auto_batch_size(n_examples), train)
    lr_given = train.get("lr")
    multiplier = given.get("learning_rate_multiplier", "auto")
    if multiplier != "auto" and lr_given is not None:
        raise _fail(f"{where}.learning_rate_multiplier and tunesmith.train.lr both set the learning rate; give one",
                    f"{where}.learning_rate_multiplier")
    if lr_given is None:
        multiplier = 1.0 if multiplier == "auto" else float(multiplier)
        train["lr"] = multiplier * default_lr
    elif isinstance(lr_given, (int, float)) and lr_given > 0:
        multiplier = lr_given / default_lr
    train.update(epochs=n_epochs, batch_size=batch_size)
    train.setdefault("seed", seed)
    hyper = {"n_epochs": n_epochs, "batch_size": batch_size, "learning_rate_multiplier": multiplier}
    if mtype == "dpo":
        pref = sections.setdefault("pref", {})
        hyper["beta"] = pick("beta", "beta", 0.1, pref)
        pref["beta"] = hyper["beta"]
    return sections, hyper


def _metadata(meta: Any) -> dict[str, str] | None:
    if meta is None:
        return None
    if not isinstance(meta, dict) or len(meta) > 16:
        raise _fail("metadata: an object of at most 16 string keys and values", "metadata")
    for k, v in meta.items():
        if not isinstance(k, str) or len(k) > 64 or not isinstance(v, str) or len(v) > 512:
            raise _fail("metadata: keys are strings of up to 64 characters, values strings of up to 512",
                        f"metadata.{k}")
    return dict(meta)


def _webhook(hook: Any) -> dict | None:
    """extra_body tunesmith.webhook = {"url": "https://...", "secret": "whsec_..."}: called when the
    job succeeds, fails or is cancelled, signed as OpenAI signs its webhooks (webhooks.py)."""
    if hook is None:
        return None
    if not isinstance(hook, dict) or set(hook) - {"url", "secret"} or not isinstance(hook.get("url"), str) \
            or not hook["url"].startswith(("http://", "https://")):
        raise _fail("tunesmith.webhook: {\"url\": \"http(s)://...\", \"secret\": \"whsec_...\"}", "tunesmith.webhook")
    if not isinstance(hook.get("secret"), str) or len(hook["secret"]) < 16:
        raise _fail("tunesmith.webhook.secret: required, a string of 16+ characters (e.g. whsec_ + base64) "
                    "that signs each call", "tunesmith.webhook.secret")
    return dict(hook)


# ---- the base model: an allow-list, never a path from the request -----------------------------------

def resolve_model(store: Store, project_id: str, model: str, data_dir: Path, models: dict[str, str]) -> dict:
    """Where the job's base model comes from: {"builtin": alias} | {"path": PATH} (a --model the service
    was started with) | {"dir": "models/NAME"} (under the data dir) | {"job": id} (an ft: model).

    Raises:
        StoreError (param model) for anything else, listing what is available.
    """
    if model.startswith(assets.PREFIX):
        if model in assets.aliases("models"):
            return {"builtin": model}
    elif model.startswith("ft:"):
        parent = store.job_for_model(project_id, model)
        if parent is not None and parent["status"] == "succeeded" and parent.get("run_dir"):
            return {"job": parent["id"]}
    elif model in models:  # a --model NAME=PATH; PATH may itself be a builtin: alias or a hub id
        target = models[model]
        return {"builtin": target} if assets.is_builtin(target) else {"path": str(Path(target).absolute())}
    elif MODEL_NAME.match(model) and (data_dir / "models" / model / "config.json").is_file():
        return {"dir": f"models/{model}"}
    names = available_models(data_dir, models)
    raise _fail(f"model {model!r} is not available for fine-tuning here; choose one of: "
                f"{', '.join(names) or '(none)'}, or an ft: model of this project", "model", "model_not_available")


def available_models(data_dir: Path, models: dict[str, str]) -> list[str]:
    builtin = assets.aliases("models")
    folders = sorted(p.name for p in (data_dir / "models").glob("*") if (p / "config.json").is_file()) \
        if (data_dir / "models").is_dir() else []
    return builtin + sorted(models) + folders


def base_path(base: dict, data_dir: Path, store: Store) -> str:
    """The base model as tunesmith's model.name_or_path, on this machine."""
    if "builtin" in base:
        return base["builtin"]
    if "path" in base:
        return base["path"]
    if "dir" in base:
        return str(data_dir / base["dir"])
    parent = data_dir / store.job(base["job"])["run_dir"]
    # A run that saved a whole model is a base as it is; an adapter run is merged once (runner.py)
    return str(parent if (parent / "model").is_dir() else parent / "merged")


def check_config(sections: dict, model_path: str, train_path: Path, val_path: Path | None) -> RunConfig:
    """Validate the sections as tunesmith would (StoreError with param tunesmith.<field>)."""
    tree = _tree(sections, model_path, train_path, val_path, Path("/nonexistent/run"), "check")
    try:
        return load_config(tree)
    except ConfigError as e:
        raise _fail(_config_message(str(e)), "tunesmith." + _first_field(str(e)), "invalid_config") from None


def _tree(sections: dict, model_path: str, train_path: Path, val_path: Path | None, run_dir: Path,
          name: str) -> dict:
    import copy

    tree = copy.deepcopy(sections)
    tree.setdefault("model", {})["name_or_path"] = model_path
    data = tree.setdefault("data", {})
    data["train"] = str(train_path)
    if val_path is not None:
        data["validation"] = str(val_path)
    tree["output"] = {"dir": str(run_dir), "name": name, "overwrite": False}
    return tree


def _config_message(text: str) -> str:
    return text.replace("<dict>: ", "tunesmith config: ", 1)


def _first_field(text: str) -> str:
    """The dotted field of ConfigError's first '  - field: message' line ('' when none)."""
    for line in text.splitlines():
        m = re.match(r"\s*- ([a-z_]+(?:\.[a-z_]+)*):", line)
        if m:
            return m.group(1)
    return ""


def run_config(store: Store, job: dict, data_dir: Path) -> RunConfig:
    """The job's RunConfig on this worker: its files, base and run folder under this data dir."""
    train = store.get_file(job["project_id"], job["training_file"])
    val = store.get_file(job["project_id"], job["validation_file"]) if job.get("validation_file") else None
    if train is None or (job.get("validation_file") and val is None):
        raise StoreError(f"job {job['id']}: its training or validation file was deleted", "invalid_training_file",
                         "training_file")
    tree = _tree(job["tunesmith"]["config"], base_path(job["tunesmith"]["base"], data_dir, store),
                 data_dir / train["path"], data_dir / val["path"] if val else None,
                 data_dir / run_dir_of(job), job["id"])
    return load_config(tree)


def run_dir_of(job: dict) -> str:
    """The job's run folder, relative to the data dir."""
    return f"runs/{job['id']}"


# ---- names ----------------------------------------------------------------------------------------

def fine_tuned_name(job: dict, project_name: str, store: Store | None = None) -> str:
    """ft:BASE:PROJECT:SUFFIX:ID as OpenAI names fine-tuned models (an empty suffix leaves '::').
    BASE drops tunesmith's 'builtin:' (a colon would split the name); an ft: base names its own base."""
    base = job["model"]
    if base.startswith("ft:"):
        base = base.split(":")[1]
    base = base.removeprefix(assets.PREFIX)
    project = re.sub(r"[^A-Za-z0-9._-]", "-", project_name)
    return f"ft:{base}:{project}:{job.get('suffix') or ''}:{job['id'].removeprefix('ftjob-')[-8:]}"


def checkpoint_name(fine_tuned_model: str, step: int) -> str:
    return f"{fine_tuned_model}:ckpt-step-{step}"


# ---- OpenAI objects -------------------------------------------------------------------------------

def job_object(row: dict) -> dict[str, Any]:
    """A job row as OpenAI's fine_tuning.job (openai.types.fine_tuning.FineTuningJob), plus
    `user_provided_suffix` (as OpenAI returns it) and a `tunesmith` extension object."""
    cfg = (row.get("tunesmith") or {}).get("config") or {}
    return {
        "id": row["id"], "object": "fine_tuning.job", "created_at": row["created_at"],
        "error": row.get("error") or None, "fine_tuned_model": row.get("fine_tuned_model"),
        "finished_at": row.get("finished_at"), "hyperparameters": dict(row.get("hyperparameters") or {}),
        "model": row["model"], "organization_id": row["project_id"], "result_files": list(row.get("result_files") or []),
        "seed": row["seed"], "status": row["status"], "trained_tokens": row.get("trained_tokens"),
        "training_file": row["training_file"], "validation_file": row.get("validation_file"),
        "estimated_finish": row.get("estimated_finish"), "integrations": [], "metadata": row.get("metadata"),
        "method": row.get("method") or None, "user_provided_suffix": row.get("suffix"),
        "tunesmith": {"task": cfg.get("task"), "method": (cfg.get("method") or {}).get("name", "lora"),
                      "config": cfg, "total_steps": row.get("total_steps"), "attempts": row.get("attempts"),
                      "requested": row.get("requested")},
    }


def event_object(row: dict) -> dict[str, Any]:
    """An event row as OpenAI's fine_tuning.job.event."""
    return {"id": row["id"], "object": "fine_tuning.job.event", "created_at": row["created_at"], "level": row["level"],
            "message": row["message"], "type": row["type"], "data": row.get("data")}


def checkpoint_object(row: dict) -> dict[str, Any]:
    """A checkpoint row as OpenAI's fine_tuning.job.checkpoint."""
    return {"id": row["id"], "object": "fine_tuning.job.checkpoint", "created_at": row["created_at"],
            "fine_tuned_model_checkpoint": row["fine_tuned_model_checkpoint"], "fine_tuning_job_id": row["job_id"],
            "metrics": dict(row.get("metrics") or {}, step=row["step"]), "step_number": row["step"]}
