"""Train the tiny VLM on `SynthWorld` in two stages (see the tiny-model notes).

Stage 1: the CLIP vision tower alone, with linear heads (entity, colour, shape, pattern) on the mean of
its last hidden state over patch tokens. Stage 2: the whole LLaVA on VQA, captions and text-only facts
(loss on answer + EOS); the vision tower is frozen for the first `freeze_steps`, then trained at 0.1x
the scheduled learning rate together with the heads as an auxiliary loss. Step-based cosine schedules,
fresh renderings (seeds < `EVAL_SEED`) every batch, one torch thread by default.
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

from ..data.world import (ATTRIBUTES, CAPTION_PROMPTS, COLOURS, EVAL_SEED, FACTS, PATTERNS, QUESTIONS, SHAPES,
                          TEXT_QUESTIONS, SynthWorld)
from .batch import Encoder, Example, pixels
from .build import build_tiny

LR, BETAS, WD = 2e-3, (0.9, 0.98), 0.05


def _aux_labels(e) -> dict:
    return {"entity": e.index, "colour": list(COLOURS).index(e.colour), "shape": SHAPES.index(e.shape),
            "pattern": PATTERNS.index(e.pattern)}


def sample(world: SynthWorld, rng: random.Random) -> Example:
    """One training item: 70% image question (15% of them looks, 85% facts), 15% caption, 15% text-only."""
    u = rng.random()
    if u < 0.85:
        e = rng.choice(world.entities)
        image = world.render(e, rng.randrange(EVAL_SEED))
        if u < 0.70:
            key = rng.choice(ATTRIBUTES) if rng.random() < 0.15 else rng.choice(FACTS)
            question, answer = rng.choice(QUESTIONS[key]), e.get(key)
        else:
            question, answer = rng.choice(CAPTION_PROMPTS), world.caption(e)
        return Example(image, question, answer, aux=_aux_labels(e))
    rel = "capital" if rng.random() < 1 / 3 else "diet_by_name"
    _, subj, answer = rng.choice([t for t in world.text_facts() if t[0] == rel])
    return Example(None, world.text_question(rel, subj, rng.randrange(len(TEXT_QUESTIONS[rel]))), answer)


class Heads(nn.Module):
    """Linear classifiers on pooled patch features; only used during training (never saved)."""

    def __init__(self, width: int, n_entities: int):
        super().__init__()
        self.heads = nn.ModuleDict({"entity": nn.Linear(width, n_entities), "colour": nn.Linear(width, len(COLOURS)),
                                    "shape": nn.Linear(width, len(SHAPES)), "pattern": nn.Linear(width, len(PATTERNS))})

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


def _groups(named_params, scale: float) -> list[dict]:
    """AdamW groups: weight decay on 2-D non-embedding weights only; `scale` multiplies the scheduled lr."""
    decay, rest = [], []
    for name, p in named_params:
        (decay if p.ndim == 2 and "embed" not in name else rest).append(p)
    return [{"params": decay, "weight_decay": WD, "scale": scale},
            {"params": rest, "weight_decay": 0.0, "scale": scale}]


def _labels(auxes: list[dict]) -> dict:
    """Stack the heads' class labels of the image items (text-only items have an empty `aux`)."""
    auxes = [a for a in auxes if a]
    return {k: torch.tensor([a[k] for a in auxes]) for k in ("entity", "colour", "shape", "pattern")}


def train_tiny(out_dir, seed: int = 0, stage1_steps: int = 4500, stage2_steps: int = 2400, batch_size: int = 64,
               freeze_steps: int = 500, threads: int = 1, progress: bool = True, eval_per_cell: int | None = 50,
               greedy: int = 100) -> dict:
    """Train from scratch on `SynthWorld(seed)` and write model + processor (safetensors) and metrics.json.

    Returns the metrics dict. `eval_per_cell=0` skips the final held-out evaluation.
    """
    torch.set_num_threads(threads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    world = SynthWorld(seed)
    model, processor = build_tiny(world, seed)
    enc = Encoder(processor.tokenizer)
    vision = model.model.vision_tower
    heads = Heads(model.config.vision_config.hidden_size, len(world.entities))
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
        loss, acc = heads(vision(px).last_hidden_state, _labels([_aux_labels(e) for e in ents]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(opt.param_groups[0]["params"] + opt.param_groups[1]["params"], 1.0)
        opt.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", entity=f"{acc['entity']:.2f}", shape=f"{acc['shape']:.2f}")
    log["stage1_seconds"] = round(time.time() - t0, 1)
    if stage1_steps:
        log["stage1_last_batch_acc"] = acc

    # -- stage 2: whole VLM; vision frozen, then at 0.1x lr with the heads as an auxiliary loss
    captured = {}
    hook = vision.register_forward_hook(lambda m, i, o: captured.__setitem__("h", o.last_hidden_state))
    rest = [(n, p) for n, p in model.named_parameters() if not n.startswith("model.vision_tower.")]
    opt = torch.optim.AdamW(_groups(rest, 1.0) + _groups(list(vision.named_parameters())
                                                         + list(heads.named_parameters()), 0.1),
                            lr=LR, betas=BETAS)
    params = [p for g in opt.param_groups for p in g["params"]]
    t1 = time.time()
    bar = tqdm(range(stage2_steps), desc="stage 2 (VLM)", disable=not progress)
    for step in bar:
        frozen = step < freeze_steps
        vision.requires_grad_(not frozen)
        heads.requires_grad_(not frozen)
        for g in opt.param_groups:
            g["lr"] = LR * _cosine(step, stage2_steps, 100, 0.05) * g["scale"]
        examples = [sample(world, rng) for _ in range(batch_size)]
        loss = model(**enc.batch(examples)).loss
        aux = torch.zeros(())
        if not frozen and "h" in captured:
            aux, _ = heads(captured["h"], _labels([ex.aux for ex in examples]))
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

    model.eval()
    model.save_pretrained(out)
    processor.save_pretrained(out)
    metrics = {"seed": seed, "stage1_steps": stage1_steps, "stage2_steps": stage2_steps, "batch_size": batch_size,
               "threads": threads, **log, "train_seconds": round(time.time() - t0, 1),
               "parameters": sum(p.numel() for p in model.parameters())}
    if eval_per_cell != 0:
        metrics["heldout"] = evaluate_and_report(model, processor, world, eval_per_cell, greedy)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics


def evaluate_and_report(model, processor, world, per_cell, greedy) -> dict:
    from .evaluate import evaluate_tiny

    return evaluate_tiny(model, processor, world, per_cell=per_cell, seed=1, greedy=greedy)


def main(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="Train the tiny VLM (unike/tiny/weights by default).")
    ap.add_argument("--out", default=str(Path(__file__).parent / "weights"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stage1-steps", type=int, default=4500)
    ap.add_argument("--stage2-steps", type=int, default=2400)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    m = train_tiny(a.out, a.seed, a.stage1_steps, a.stage2_steps, threads=a.threads)
    print(json.dumps({k: v for k, v in m.items() if k != "heldout"}, indent=1))
    print(json.dumps(m.get("heldout", {}), indent=1))


if __name__ == "__main__":
    main()
