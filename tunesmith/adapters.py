"""The adapter lifecycle: inspect, list, merge into the base, combine several into one.

Adapters are peft's (or our bottleneck format); merged models are plain transformers folders.
Every write goes to a temporary folder renamed into place, so a failure leaves nothing behind.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from tunesmith.config import load_config
from tunesmith.errors import TunesmithError
from tunesmith.methods.bottleneck import CONFIG_FILE as BOTTLENECK_CONFIG
from tunesmith.methods.diff_pruning import CONFIG_FILE as DIFF_CONFIG
from tunesmith.methods.diff_pruning import diff_info
from tunesmith.utils import folder_bytes, output_folder

MERGEABLE = {"LORA", "IA3", "LOHA", "LOKR"}  # linear updates that fold into the base weights
COMBINATIONS = ("linear", "cat", "svd", "ties", "ties_svd", "dare_linear", "dare_ties", "magnitude_prune")


def _saved_folder(path: Path) -> Path | None:
    for sub in ("adapter", "bottleneck", "diff", "model"):
        if (path / sub).is_dir():
            return path / sub
    return None


def adapter_info(path: str | Path) -> dict:
    """What a run folder, a peft adapter folder or a bottleneck folder holds.

    Returns method, rank/alpha/targets (where they apply), base model, task, size on disk,
    and for runs the trainable-parameter counts and checkpoint size against the base model's.
    """
    path = Path(path)
    run = json.loads((path / "run.json").read_text()) if (path / "run.json").is_file() else None
    folder = _saved_folder(path) if run is not None else path
    if folder is None or not folder.is_dir():
        raise TunesmithError(f"{path}: no adapter or model here (expected a run folder, or a folder with "
                             f"adapter_config.json, {BOTTLENECK_CONFIG} or {DIFF_CONFIG})")
    info: dict = {"path": str(path), "folder": str(folder), "size_bytes": folder_bytes(folder)}
    if (folder / "adapter_config.json").is_file():
        info.update(_peft_info(json.loads((folder / "adapter_config.json").read_text())))
    elif (folder / BOTTLENECK_CONFIG).is_file():
        meta = json.loads((folder / BOTTLENECK_CONFIG).read_text())
        info.update({"kind": "bottleneck adapter (tunesmith format)", "method": "adapter", "mergeable": False,
                     "base_model": meta["base_model_name_or_path"], "task": meta["task"],
                     "adapter_size": meta["adapter_size"], "placement": meta["placement"], "layers": meta.get("layers")})
    elif (folder / DIFF_CONFIG).is_file():
        info.update(diff_info(folder))
    elif (folder / "config.json").is_file():
        info.update({"kind": "full model (transformers format)", "mergeable": False})
    else:
        raise TunesmithError(f"{folder}: neither a peft adapter (adapter_config.json), a bottleneck adapter "
                             f"({BOTTLENECK_CONFIG}) nor a transformers model (config.json)")
    if run is not None:
        info.update({"run": run.get("name"), "method": run.get("method", info.get("method")), "task": run.get("task"),
                     "base_model": run.get("base_model"), "quantize": run.get("quantize", "none"),
                     "params": run.get("param_counts"), "checkpoint_bytes": run.get("checkpoint_bytes"),
                     "base_model_bytes": run.get("base_model_bytes"), "labels": run.get("labels"),
                     "combined_from": run.get("combined_from")})
    return {k: v for k, v in info.items() if v is not None}


def _peft_info(c: dict) -> dict:
    ptype = c.get("peft_type", "?")
    method = {"LORA": "dora" if c.get("use_dora") else "lora", "IA3": "ia3", "LOHA": "loha", "LOKR": "lokr",
              "PREFIX_TUNING": "prefix", "PROMPT_TUNING": "prompt", "P_TUNING": "ptuning"}.get(ptype, ptype.lower())
    out = {"kind": "peft adapter", "method": method, "peft_type": ptype, "task": c.get("task_type"),
           "base_model": c.get("base_model_name_or_path"), "mergeable": ptype in MERGEABLE,
           "modules_to_save": c.get("modules_to_save")}
    if ptype in ("LORA", "LOHA", "LOKR"):
        out.update({"r": c.get("r"), "alpha": c.get("lora_alpha", c.get("alpha")), "rslora": c.get("use_rslora"),
                    "target_modules": _targets(c.get("target_modules")), "layers": c.get("layers_to_transform")})
    elif ptype == "IA3":
        out.update({"target_modules": _targets(c.get("target_modules")),
                    "feedforward_modules": _targets(c.get("feedforward_modules"))})
    else:
        out["num_virtual_tokens"] = c.get("num_virtual_tokens")
    return out


def _targets(t) -> list[str] | str | None:
    return sorted(t) if isinstance(t, (list, set, tuple)) else t


def list_adapters(root: str | Path) -> list[dict]:
    """Every run or adapter folder under `root` (itself included), with adapter_info's fields."""
    root = Path(root)
    if not root.is_dir():
        raise TunesmithError(f"{root}: not a folder")
    found = []
    candidates = [root] + sorted(p for p in root.rglob("*") if p.is_dir() and "checkpoints" not in p.parts)
    for p in candidates:
        if any(p.is_relative_to(f["path"]) for f in found if Path(f["path"]) != p):
            continue  # the adapter/ folder inside a run already listed
        if any((p / f).is_file() for f in ("run.json", "adapter_config.json", BOTTLENECK_CONFIG, DIFF_CONFIG)):
            found.append(adapter_info(p))
    return found


def format_info(info: dict) -> str:
    mb = lambda b: f"{b / 2**20:.2f} MB" if b is not None else "?"  # noqa: E731
    lines = [f"{info['path']}", f"  kind:        {info['kind']}", f"  method:      {info.get('method', '?')}"]
    for key in ("task", "base_model", "quantize", "r", "alpha", "rslora", "target_modules", "feedforward_modules",
                "layers", "num_virtual_tokens", "adapter_size", "placement", "mode", "density", "modules_to_save",
                "labels", "combined_from"):
        if info.get(key) not in (None, [], "none"):
            lines.append(f"  {key + ':':<12} {info[key]}")
    if info.get("changed_entries") is not None:
        lines.append(f"  changed:     {info['changed_entries']:,} of {info['chosen_entries']:,} entries of the chosen "
                     f"weights; {100 * info['changed_entries'] / info['body_params']:.3f}% of the body's "
                     f"{info['body_params']:,} weights; diff file {mb(info['diff_bytes'])}")
    lines.append(f"  size:        {mb(info['size_bytes'])} ({info['folder']})")
    if info.get("params"):
        p = info["params"]
        lines.append(f"  trainable:   {p['trainable']:,} of {p['total']:,} params ({p['percent']:.3f}%)")
    if info.get("checkpoint_bytes") and info.get("base_model_bytes"):
        lines.append(f"  checkpoint:  {mb(info['checkpoint_bytes'])} (weights + optimizer state) vs "
                     f"{mb(info['base_model_bytes'])} for a full copy of the base weights")
    lines.append(f"  mergeable:   {'yes' if info.get('mergeable') else 'no'}")
    return "\n".join(lines)


def merge(run: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Fold a run's adapter into the full-precision base and save a plain transformers model.

    An adapter trained on a 4-bit or 8-bit base merges onto the full-precision base (the usual
    QLoRA deployment path). A sparse diff (diff pruning) is added into the base weights.
    Prompt-learning and bottleneck adapters cannot be merged.
    """
    from tunesmith.methods.saved import load_run

    info = adapter_info(run)
    if info["kind"].startswith("full model"):
        raise TunesmithError(f"{run}: method {info.get('method')} already saved a plain transformers model in "
                             f"{info['folder']}; load that folder directly")
    if not info.get("mergeable"):
        raise TunesmithError(f"{run}: a {info.get('method')} adapter cannot be merged into the base weights "
                             "(only LoRA, DoRA, IA3, LoHa and LoKr updates and sparse diffs are linear in the "
                             "weights); serve it "
                             "with its base instead")
    from peft import PeftModel
    from tunesmith.methods.saved import MERGED_CONFIG

    loaded = load_run(run, quantized=False)
    # load_run adds a sparse diff into the base weights already; a peft adapter is folded in here.
    merged = loaded.model.merge_and_unload() if isinstance(loaded.model, PeftModel) else loaded.model
    with output_folder(Path(out), overwrite) as tmp:
        merged.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)
        # the run's task, columns and template travel with the weights: predict/eval on the folder use them
        shutil.copyfile(Path(run) / "config.yaml", tmp / MERGED_CONFIG)
    return Path(out)


def combine(runs: list[str | Path], out: str | Path, weights: list[float] | None = None, how: str = "linear",
            density: float | None = None, overwrite: bool = False) -> Path:
    """Combine LoRA adapters of the same base into one new run folder (peft's add_weighted_adapter).

    how: linear (weighted sum; same rank), cat (concatenate ranks), svd, ties, ties_svd,
    dare_linear, dare_ties, magnitude_prune; `density` is the fraction kept by the pruning ones.
    """
    from tunesmith.methods.saved import load_run

    if len(runs) < 2:
        raise TunesmithError("combine: give at least two runs")
    if how not in COMBINATIONS:
        raise TunesmithError(f"combine: --how must be one of {', '.join(COMBINATIONS)}")
    weights = weights or [1.0 / len(runs)] * len(runs)
    if len(weights) != len(runs):
        raise TunesmithError(f"combine: {len(weights)} weights for {len(runs)} runs")
    if ("ties" in how or "dare" in how or "prune" in how) and density is None:
        density = 0.5
    infos = [adapter_info(r) for r in runs]
    for r, i in zip(runs, infos):
        if i.get("method") != "lora" or i.get("peft_type") != "LORA":
            raise TunesmithError(f"combine: {r} is a {i.get('method')} run; only plain LoRA adapters combine")
        if i.get("modules_to_save"):
            raise TunesmithError(f"combine: {r} trained its own head ({i['modules_to_save']}); heads of different "
                                 "tasks cannot be averaged, so combine generative (sft/cpt) LoRA adapters")
    bases = {(i["base_model"], i["task"]) for i in infos}
    if len(bases) > 1:
        raise TunesmithError(f"combine: the runs have different bases or tasks: {sorted(bases)}")
    if how == "linear" and len({i["r"] for i in infos}) > 1:
        raise TunesmithError("combine: linear needs equal ranks; use cat, svd or ties_svd for different ranks")

    first = load_run(runs[0], quantized=False)
    model = first.model
    names = ["a0"] + [f"a{k}" for k in range(1, len(runs))]
    model.load_adapter(str(Path(runs[0]) / "adapter"), adapter_name="a0")
    for k, r in enumerate(runs[1:], 1):
        model.load_adapter(str(Path(r) / "adapter"), adapter_name=f"a{k}")
    model.add_weighted_adapter(names, weights, adapter_name="combined", combination_type=how, density=density)
    with output_folder(Path(out), overwrite) as tmp:
        model.save_pretrained(tmp / "_peft", selected_adapters=["combined"])
        os.replace(tmp / "_peft" / "combined", tmp / "adapter")
        shutil.rmtree(tmp / "_peft")
        first.tokenizer.save_pretrained(tmp / "adapter")
        cfg = first.cfg.model_copy(update={"output": first.cfg.output.model_copy(update={"name": Path(out).name})})
        (tmp / "config.yaml").write_text((Path(runs[0]) / "config.yaml").read_text())
        load_config(tmp / "config.yaml")  # the copied config must still load
        run_json = json.loads((Path(runs[0]) / "run.json").read_text())
        run_json.update({"name": cfg.output.name, "status": "combined", "combined_from": [str(r) for r in runs],
                         "combination": {"how": how, "weights": weights, "density": density},
                         "saved_as": "adapter", "saved_bytes": folder_bytes(tmp / "adapter")})
        for k in ("steps", "train_seconds", "wall_seconds", "best_value", "best_step", "checkpoint_bytes", "peak_rss_mb"):
            run_json.pop(k, None)
        (tmp / "run.json").write_text(json.dumps(run_json, indent=2))
    return Path(out)
