"""Train the tiny VLM on `SynthWorld` in two stages (see the tiny-model notes).

Stage 1: the CLIP vision tower alone, with linear heads (entity and each look) on the mean of its last
hidden state over patch tokens. Stage 2: the whole LLaVA on a mix (`unike.tiny.items.Mix`) of plain
items (VQA, captions, text-only facts), format A items (text demonstrations, as `PromptIKE` writes them)
and format B items (an image demonstration, hidden from the query in `hide_layers`); loss on answer +
EOS. The vision tower is frozen for the first `freeze_steps`, then trained at 0.1x the scheduled
learning rate together with the heads as an auxiliary loss. Step-based cosine schedules, fresh
renderings (seeds < `EVAL_SEED`) every batch, one torch thread by default.
"""
from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..data.world import EVAL_SEED, SynthWorld
from .batch import Encoder, pixels
from .build import TEXT_LAYERS, build_tiny
from .hide import hide
from .items import Items, Mix

LR, BETAS, WD = 2e-3, (0.9, 0.98), 0.05


class Heads(nn.Module):
    """Linear classifiers on pooled patch features (entity and each look); only used in training, never saved."""

    def __init__(self, width: int, classes: dict[str, int]):
        super().__init__()
        self.heads = nn.ModuleDict({k: nn.Linear(width, n) for k, n in classes.items()})

    def forward(self, hidden: torch.Tensor, labels: dict) -> tuple[torch.Tensor, dict]:
        pooled = hidden[:, 1:].mean(1)  # patch tokens, CLS excluded
        loss, acc = 0.0, {}
        for k, head in self.heads.items():
            logits = head(pooled)
            loss = loss + nn.functional.cross_entropy(logits, labels[k])
            acc[k] = (logits.argmax(-1) == labels[k]).float().mean().item()
        return loss, acc


def _cosine(step: int, total: int, warmup: int, floor: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def _stage2_lr(step: int, total: int, icl_start: int) -> float:
    """Stage 2's lr factor: one warm-up + cosine, or (curriculum) one for the plain phase, one from `icl_start`."""
    if step < icl_start:
        return _cosine(step, icl_start, 100, 0.05)
    return _cosine(step - icl_start, total - icl_start, 30 if icl_start else 100, 0.05)


def _groups(named_params, scale: float) -> list[dict]:
    """AdamW groups: weight decay on 2-D non-embedding weights only; `scale` multiplies the scheduled lr."""
    decay, rest = [], []
    for name, p in named_params:
        (decay if p.ndim == 2 and "embed" not in name else rest).append(p)
    return [{"params": decay, "weight_decay": WD, "scale": scale},
            {"params": rest, "weight_decay": 0.0, "scale": scale}]


def _labels(auxes: list[dict]) -> dict:
    """Stack the heads' class labels, one dict per image in batch order."""
    return {k: torch.tensor([a[k] for a in auxes]) for k in auxes[0]}


def train_tiny(out_dir, seed: int = 0, stage1_steps: int = 4500, stage2_steps: int = 2400, batch_size: int = 64,
               freeze_steps: int = 500, threads: int = 1, progress: bool = True, eval_per_cell: int | None = 50,
               greedy: int = 100, mix: tuple[float, float, float] = (0.5, 0.3, 0.2), cf_rate: float = 0.4,
               hide_layers: tuple[int, ...] = (0, 1), eval_every: int = 0, eval_n: int = 100,
               chunks: int = 2, icl_start: int = 0, world: SynthWorld | None = None) -> dict:
    """Train from scratch on `world` (default `SynthWorld(seed)`); write model + processor (safetensors),
    metrics.json and, with `eval_every` > 0, curve.jsonl (held-out figures every `eval_every` stage-2 steps).

    `mix`: stage-2 weights of plain, format A and format B items (`unike.tiny.items`); `cf_rate`: share of
    format A items with a counterfactual demonstration; format B items are trained with the query's
    attention to the demonstration blocked in `hide_layers`. Each stage-2 batch, sorted by length, runs as
    `chunks` forward passes (the same loss, less padding). With `icl_start` > 0, stage-2 steps before it
    draw plain items only, and the mix starts at it with a fresh warm-up and cosine over the remaining
    steps (a curriculum: plain first). Returns the metrics dict;
    `eval_per_cell=0` skips the final held-out evaluation.
    """
    checks = {"batch_size": (batch_size, "positive", batch_size > 0),
              "chunks": (chunks, "between 1 and batch_size", 1 <= chunks <= batch_size),
              "icl_start": (icl_start, f"0 or below stage2_steps={stage2_steps}",
                            0 <= icl_start < max(1, stage2_steps)),
              "hide_layers": (hide_layers, f"layer indices in [0, {TEXT_LAYERS})",
                              all(0 <= i < TEXT_LAYERS for i in hide_layers)),
              "eval_every": (eval_every, ">= 0", eval_every >= 0)}
    problems = [f"{name} must be {rule}, got {value!r}" for name, (value, rule, ok) in checks.items() if not ok]
    if problems:
        raise ValueError("train_tiny: " + "; ".join(problems))
    world = world or SynthWorld(seed)
    items = Items(world)
    sampler = Mix(items, *mix, cf_rate=cf_rate)
    torch.set_num_threads(threads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, processor = build_tiny(world, seed)
    enc = Encoder(processor.tokenizer)
    vision = model.model.vision_tower
    heads = Heads(model.config.vision_config.hidden_size, items.aux_classes())
    rng = random.Random(seed)
    t0, log = time.time(), {}

    # -- stage 1: vision tower + heads
    model.train()
    opt = torch.optim.AdamW(_groups(list(vision.named_parameters()) + list(heads.named_parameters()), 1.0),
                            lr=LR, betas=BETAS)
    bar = tqdm(range(stage1_steps), desc="stage 1 (vision)", disable=not progress)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = LR * _cosine(step, stage1_steps, 50, 0.1)
        ents = [rng.choice(world.entities) for _ in range(batch_size)]
        px = torch.stack([pixels(world.render(e, rng.randrange(EVAL_SEED))) for e in ents])
        loss, acc = heads(vision(px).last_hidden_state, _labels([items.aux(e) for e in ents]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(opt.param_groups[0]["params"] + opt.param_groups[1]["params"], 1.0)
        opt.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", entity=f"{acc['entity']:.2f}")
    log["stage1_seconds"] = round(time.time() - t0, 1)
    if stage1_steps:
        log["stage1_last_batch_acc"] = acc

    # -- stage 2: whole VLM; vision frozen, then at 0.1x lr with the heads as an auxiliary loss
    captured: list[torch.Tensor] = []
    hook = vision.register_forward_hook(lambda m, i, o: captured.append(o.last_hidden_state))
    rest = [(n, p) for n, p in model.named_parameters() if not n.startswith("model.vision_tower.")]
    opt = torch.optim.AdamW(_groups(rest, 1.0) + _groups(list(vision.named_parameters())
                                                         + list(heads.named_parameters()), 0.1),
                            lr=LR, betas=BETAS)
    params = [p for g in opt.param_groups for p in g["params"]]
    curve = (out / "curve.jsonl").open("w") if eval_every else None
    t1 = time.time()
    bar = tqdm(range(stage2_steps), desc="stage 2 (VLM)", disable=not progress)
    for step in bar:
        if curve is not None and step % eval_every == 0 and step:
            _log_curve(curve, model, processor, world, step, eval_n, hide_layers, time.time() - t1, bar)
            captured.clear()
        frozen = step < freeze_steps
        vision.requires_grad_(not frozen)
        heads.requires_grad_(not frozen)
        for g in opt.param_groups:
            g["lr"] = LR * g["scale"] * _stage2_lr(step, stage2_steps, icl_start)
        draw = sampler if step >= icl_start else items.plain
        examples = sorted((draw(rng) for _ in range(batch_size)), key=lambda ex: len(enc.encode(ex)[0]))
        loss = _loss(model, enc, examples, chunks, hide_layers)
        aux = torch.zeros(())
        if not frozen and captured:
            aux, _ = heads(torch.cat(captured), _labels([a for ex in examples for a in ex.aux]))
        captured.clear()
        opt.zero_grad(set_to_none=True)
        (loss + aux).backward()
        nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], 1.0)
        opt.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", aux=f"{aux.item():.3f}")
    hook.remove()
    model.requires_grad_(True)
    log["stage2_seconds"] = round(time.time() - t1, 1)
    if stage2_steps:
        log["stage2_last_loss"] = round(loss.item(), 4)
    if curve is not None:
        _log_curve(curve, model, processor, world, stage2_steps, eval_n, hide_layers, time.time() - t1, bar)
        curve.close()

    model.eval()
    model.save_pretrained(out)
    processor.save_pretrained(out)
    metrics = {"seed": seed, "stage1_steps": stage1_steps, "stage2_steps": stage2_steps, "batch_size": batch_size,
               "freeze_steps": freeze_steps, "mix": dict(zip(("plain", "a", "b"), mix)), "cf_rate": cf_rate,
               "hide_layers": list(hide_layers), "icl_start": icl_start, "chunks": chunks, "threads": threads, **log,
               "train_seconds": round(time.time() - t0, 1), "parameters": sum(p.numel() for p in model.parameters())}
    if eval_per_cell != 0:
        from .evaluate import evaluate_in_context, evaluate_tiny

        metrics["heldout"] = evaluate_tiny(model, processor, world, per_cell=eval_per_cell, seed=1, greedy=greedy)
        metrics["in_context"] = evaluate_in_context(model, processor, world, n=4 * eval_n, seed=1,
                                                    hide_layers=hide_layers, greedy=greedy)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics


def _loss(model, enc: Encoder, examples: list, chunks: int, hide_layers) -> torch.Tensor:
    """Mean loss over the answer tokens of `examples`, run as `chunks` forward passes over runs of similar
    length (less padding: a pass costs about its padded token count)."""
    total, n_all = 0.0, 0
    size = math.ceil(len(examples) / chunks)
    for i in range(0, len(examples), size):
        batch = enc.batch(examples[i:i + size])
        n = int((batch["labels"][:, 1:] != -100).sum())
        with hide(model, batch.pop("demo", None), hide_layers):
            total = total + model(**batch).loss * n
        n_all += n
    return total / n_all


def _log_curve(curve, model, processor, world, step, n, hide_layers, seconds, bar) -> None:
    """Append one line of quick held-out figures (teacher-forced; plain VQA, caption, text, in-context)."""
    from .evaluate import evaluate_in_context, evaluate_tiny

    plain = evaluate_tiny(model, processor, world, per_cell=max(1, n // 15), seed=2)
    row = {"step": step, "seconds": round(seconds, 1), **{k: plain[k] for k in ("vqa", "caption", "text")},
           **evaluate_in_context(model, processor, world, n=n, seed=2, hide_layers=hide_layers)}
    curve.write(json.dumps(row) + "\n")
    curve.flush()
    bar.write(json.dumps(row))


def _floats(text: str, n: int | None = None) -> tuple:
    vals = tuple(float(x) for x in text.split(",") if x.strip())
    if n is not None and len(vals) != n:
        raise ValueError(f"expected {n} comma-separated numbers, got {text!r}")
    return vals


def main(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="Train the tiny VLM (unike/tiny/weights by default).")
    ap.add_argument("--out", default=str(Path(__file__).parent / "weights"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stage1-steps", type=int, default=4500)
    ap.add_argument("--stage2-steps", type=int, default=2400)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--freeze-steps", type=int, default=500, help="stage-2 steps with the vision tower frozen")
    ap.add_argument("--mix", default="0.5,0.3,0.2", help="stage-2 weights of plain, format A, format B items")
    ap.add_argument("--icl-start", type=int, default=0,
                    help="stage-2 step where the mix starts (plain items before it; the lr schedule restarts)")
    ap.add_argument("--cf-rate", type=float, default=0.4, help="share of format A items with a counterfactual")
    ap.add_argument("--hide-layers", default="0,1",
                    help="decoder layers where format B queries cannot see the demonstration ('' for none)")
    ap.add_argument("--eval-every", type=int, default=0, help="log held-out figures every N stage-2 steps")
    ap.add_argument("--eval-n", type=int, default=100, help="items per in-context group in those evaluations")
    ap.add_argument("--eval-per-cell", type=int, default=50, help="final evaluation size (0: skip it)")
    ap.add_argument("--greedy", type=int, default=100, help="items per group decoded greedily at the end")
    ap.add_argument("--chunks", type=int, default=2, help="forward passes per stage-2 batch, by length")
    ap.add_argument("--world-version", type=int, default=None, help="SynthWorld version (default: its default)")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    world = SynthWorld(a.seed) if a.world_version is None else SynthWorld(a.seed, version=a.world_version)
    m = train_tiny(a.out, a.seed, a.stage1_steps, a.stage2_steps, a.batch_size, a.freeze_steps, a.threads,
                   eval_per_cell=a.eval_per_cell, greedy=a.greedy,
                   mix=_floats(a.mix, 3), cf_rate=a.cf_rate, hide_layers=tuple(int(x) for x in _floats(a.hide_layers)),
                   eval_every=a.eval_every, eval_n=a.eval_n, chunks=a.chunks, icl_start=a.icl_start, world=world)
    print(json.dumps({k: v for k, v in m.items() if k not in ("heldout", "in_context")}, indent=1))
    print(json.dumps({k: m[k] for k in ("heldout", "in_context") if k in m}, indent=1))


if __name__ == "__main__":
    main()
