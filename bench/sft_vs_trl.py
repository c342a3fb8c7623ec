"""SFT throughput and memory: tunesmith against trl's SFTTrainer, same model, data, adapter and batch.

    python bench/sft_vs_trl.py                 # 32 optimizer steps each, on this machine's device
    python bench/sft_vs_trl.py --steps 8       # a quick look
    python bench/sft_vs_trl.py --gc on         # only the gradient-checkpointing pair

Both sides train SmolLM2-135M-Instruct with LoRA (r 16, alpha 32, dropout 0, every linear layer)
on the identity SFT data (examples/data/identity: prompt/completion pairs, rendered with the
model's chat template under the same system prompt, loss on the completion only, max length 128).
Both use batch 8, a constant learning rate of 1e-3 with no warmup, AdamW with weight decay 0.01,
gradient clipping at 1.0, no packing and seed 0. Precision is each side's default on this machine:
fp32 on a CPU without native bf16, bf16 autocast on a GPU.

Gradient checkpointing is set the same on both sides, once on and once off (`--gc both`, the
default). trl's SFTConfig turns it on by default and tunesmith leaves it off by default, so
comparing the two defaults would set a memory-saving, compute-costing trl against a tunesmith
that keeps every activation. Each pair's ratios are printed separately.

Each side runs in its own process, so its peak RSS is its own. The table reports:
- tokens/s: non-padding tokens through training steps / training seconds;
- peak RSS from the start of the process to the end of training (model loading and data
  included on both sides; tunesmith's final evaluation, which trl does not run, excluded and
  reported apart in the JSON), and peak GPU memory where there is a GPU;
- the mean training loss of the last 8 steps. The two batch orders differ (trl shuffles
  uniformly; tunesmith groups similar lengths), so these agree only roughly;
- the held-out loss after training: each side's saved adapter is loaded with
  `peft.PeftModel.from_pretrained` and scored by one function here, on the 30 held-out identity
  questions (completion tokens only). That is the like-for-like "equal loss" check.

The ratios come last.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = [ROOT / "examples/data/identity/train.jsonl", ROOT / "examples/data/identity/general.jsonl"]
SYSTEM = "You are a helpful assistant."
MODEL = "builtin:SmolLM2-135M-Instruct"
BATCH, LR, MAX_LEN, LAST = 8, 1e-3, 128, 8


def _peaks() -> dict:
    import torch

    from tunesmith.utils import peak_rss_mb

    return {"peak_rss_mb": peak_rss_mb(),
            "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None}


def heldout_loss(model_name: str, adapter_dir: str) -> float:
    """Mean completion-token loss of base + saved adapter on the identity test set (30 held-out
    questions), computed here by one function for both sides.

    The two sides see their training batches in different orders, so their training losses agree
    only roughly; this is the like-for-like check that they learned the same thing. Both adapters
    go through `peft.PeftModel.from_pretrained`, the format a user would load.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.models.load import resolve_model_path

    path = resolve_model_path(model_name)
    tok = AutoTokenizer.from_pretrained(path)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), adapter_dir).to(device).eval()
    total, count = 0.0, 0
    for line in (ROOT / "examples/data/identity/test.jsonl").read_text().splitlines():
        r = json.loads(line)
        msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": r["prompt"]}]
        prompt = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        full = tok.apply_chat_template(msgs + [{"role": "assistant", "content": r["completion"]}], tokenize=True,
                                       return_dict=True)["input_ids"]
        assert full[:len(prompt)] == prompt, "chat template: the prompt is not a prefix of the full conversation"
        ids = torch.tensor([full], device=device)
        labels = ids.clone()
        labels[:, :len(prompt)] = -100
        with torch.no_grad():
            logits = model(input_ids=ids).logits.float()
        nll = torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100, reduction="sum")
        total, count = total + nll.item(), count + int((labels[0, 1:] != -100).sum())
    return total / count


def run_trl(steps: int, model_name: str, gc: bool) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from tunesmith.models.load import resolve_model_path

    rows = [json.loads(line) for f in DATA for line in f.read_text().splitlines() if line.strip()]
    ds = Dataset.from_list([{"prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": r["prompt"]}],
                             "completion": [{"role": "assistant", "content": r["completion"]}]} for r in rows])
    path = resolve_model_path(model_name)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    gpu = torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(output_dir=out, max_steps=steps, per_device_train_batch_size=BATCH, learning_rate=LR,
                         lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.01, max_grad_norm=1.0,
                         logging_steps=1, save_strategy="no", report_to=[], max_length=MAX_LEN, packing=False,
                         seed=0, bf16=gpu, use_cpu=not gpu, include_num_input_tokens_seen="non_padding",
                         gradient_checkpointing=gc,
                         dataloader_num_workers=0, disable_tqdm=True)
        trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok,
                             peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                                    task_type="CAUSAL_LM"))
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        result = trainer.train()
        peaks = _peaks()  # before the held-out evaluation below, like tunesmith's training peak
        trainer.model.save_pretrained(f"{out}/adapter")
        heldout = heldout_loss(model_name, f"{out}/adapter")
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    secs = result.metrics["train_runtime"]
    tokens = int(trainer.state.num_input_tokens_seen)
    return {"side": "trl SFTTrainer", "gc": gc, "steps": steps, "train_s": secs, "tokens": tokens, "tokens_per_s": tokens / secs,
            "loss_last": sum(losses[-LAST:]) / len(losses[-LAST:]), "heldout_loss": heldout, "losses": losses, **peaks}


def run_tunesmith(steps: int, model_name: str, gc: bool) -> dict:
    from tunesmith.train import train
    from tunesmith.utils import peak_rss_mb

    with tempfile.TemporaryDirectory() as out:
        res = train(ROOT / "configs/sft-identity-lora.yaml", [
            f"--model.name_or_path={model_name}", f"--train.max_steps={steps}", "--train.scheduler=constant", "--train.warmup_ratio=0", "--train.log_every=1",
            "--train.seed=0", "--train.eval_every=100000", "--method.dropout=0", "--eval.before=false",
            "--eval.generate_metrics=false", "--eval.samples=[]", "--eval.num_samples=0",
            f"--train.gradient_checkpointing={str(gc).lower()}",
            f"--output.dir={out}/{{name}}", "--output.name=bench"])
        peaks = _peaks()
        heldout = heldout_loss(model_name, str(res.run_dir / "adapter"))
        rows = [json.loads(line) for line in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    losses = [r["loss"] for r in train_rows]
    secs = res.summary["train_seconds"]
    return {"side": "tunesmith", "gc": gc, "steps": steps, "train_s": secs, "tokens": round(train_rows[-1]["tokens_per_s"] * secs),
            "tokens_per_s": train_rows[-1]["tokens_per_s"], "loss_last": sum(losses[-LAST:]) / len(losses[-LAST:]),
            "heldout_loss": heldout, "losses": losses, **peaks, "peak_gpu_with_eval_mb": peaks["peak_gpu_mb"],
            "peak_gpu_mb": res.summary.get("train_peak_gpu_mb"),  # reset before the first step, like trl's
            # like trl's figure, the peak up to the end of training (the run's final evaluation comes after)
            "peak_rss_mb": res.summary["train_peak_rss_mb"], "peak_rss_with_eval_mb": peak_rss_mb()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--model", default=MODEL, help="model for both sides (default: the builtin SmolLM2)")
    ap.add_argument("--gc", choices=["both", "on", "off"], default="both",
                    help="gradient checkpointing on both sides: on, off, or each in turn (default)")
    ap.add_argument("--worker", choices=["trl", "tunesmith"], help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        result = (run_trl if args.worker == "trl" else run_tunesmith)(args.steps, args.model, args.gc == "on")
        Path(args.out).write_text(json.dumps(result))
        return
    results_dir = ROOT / "bench" / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    results = []
    settings = ["on", "off"] if args.gc == "both" else [args.gc]
    for gc, side in [(gc, side) for gc in settings for side in ("trl", "tunesmith")]:
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            t0 = time.perf_counter()
            subprocess.run([sys.executable, __file__, "--worker", side, "--steps", str(args.steps), "--model", args.model,
                            "--gc", gc, "--out", f.name],
                           cwd=ROOT, check=True)
            r = json.loads(Path(f.name).read_text())
            r["wall_s"] = time.perf_counter() - t0
            results.append(r)
        # each side's figures are on disk before the MFU step below, which loads the model again
        (results_dir / "sft_vs_trl-sides.json").write_text(json.dumps(results, indent=2))
    from stepbench import machine, matmul_peak, run_point  # bench/ is on sys.path: this script lives there

    device, precision = machine()
    # MFU: model FLOPs per token, counted on one LoRA step of this model at this batch shape (every
    # position a target), times tokens/s, over the matmul peak measured now in the same precision.
    flops_per_token = run_point(model_name=args.model, seq=MAX_LEN, batch=BATCH, steps=1)["flops_per_step"] / (MAX_LEN * BATCH)
    peak = matmul_peak(precision)
    for r in results:
        r["mfu"] = r["tokens_per_s"] * flops_per_token / peak
    print(f"\nSFT, SmolLM2-135M + LoRA r16, batch {BATCH}, {args.steps} steps, {device}\n")
    print("| side | gradient checkpointing | train s | tokens | tokens/s | peak RSS MB | peak GPU MB | mean loss, last 8 steps "
          "| held-out loss | MFU |\n|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['side']} | {'on' if r['gc'] else 'off'} | {r['train_s']:.1f} | {r['tokens']:,} | {r['tokens_per_s']:.0f} | {r['peak_rss_mb']:.0f} | "
              f"{r['peak_gpu_mb'] or '-'} | {r['loss_last']:.3f} | {r['heldout_loss']:.3f} | {r['mfu']:.1%} |")
    print(f"\n(MFU: {flops_per_token / 1e6:.0f} MFLOP per token x tokens/s over a {peak / 1e9:.0f} GFLOP/s matmul peak)")
    for trl, ours in zip(results[::2], results[1::2]):
        print(f"\ngradient checkpointing {'on' if trl['gc'] else 'off'} on both sides:")
        print(f"  tokens/s ratio (tunesmith / trl): {ours['tokens_per_s'] / trl['tokens_per_s']:.2f}x")
        print(f"  peak RSS ratio (tunesmith / trl): {ours['peak_rss_mb'] / trl['peak_rss_mb']:.2f}")
        if trl["peak_gpu_mb"]:
            print(f"  peak GPU memory ratio (tunesmith / trl): {ours['peak_gpu_mb'] / trl['peak_gpu_mb']:.2f}")
        print(f"  loss, last {LAST} steps: tunesmith {ours['loss_last']:.3f} vs trl {trl['loss_last']:.3f}")
        print(f"  held-out loss after {args.steps} steps (same function, both adapters): "
              f"tunesmith {ours['heldout_loss']:.3f} vs trl {trl['heldout_loss']:.3f}")
    (results_dir / f"sft_vs_trl{'-gpu' if trl['peak_gpu_mb'] else ''}.json").write_text(
        json.dumps({"device": device, "date": time.strftime("%Y-%m-%d"), "steps": args.steps, "peak_flops": peak,
                    "flops_per_token": flops_per_token, "results": results}, indent=2))
    (results_dir / "sft_vs_trl-sides.json").unlink(missing_ok=True)  # superseded by the file above


if __name__ == "__main__":
    main()
