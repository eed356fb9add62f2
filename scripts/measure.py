"""The measurements quoted in docs/method.md: one UniKE configuration on the shipped tiny model, scored by
`unike.evaluate`, optionally with α at each probe's question-final token (`unike.bench.alpha`).

    python scripts/measure.py TASK MODE K N SEED [--safe] [--protocol exact,token_acc] [--alpha N] [key=value ...]

Fit on `SynthWorld(seed=0).triplets(n=--triplets (2000), seed=3)` (its states cached under --cache), cases
`SynthWorld(seed=0).edit_cases(TASK, n=N, seed=SEED, sequence_safe=--safe)` (TASK cross: as the bench
draws them, half VQA and half captions in each K), `UniKEConfig(seed=SEED, **key=value)`
(values are Python literals: `scoped_negatives=False`, `latent_read="'heads'"`). Example, the K = 100 rows:

    python scripts/measure.py vqa sequential 100 100 14 --safe
"""
import argparse
import ast
import time
from pathlib import Path

import torch

import unike
from unike.bench.alpha import alpha_points, summary
from unike.bench.runs import Setup

FIVE = ("rel", "t_gen", "m_gen", "t_loc", "m_loc")


def fitted(fields: list[str], seed: int, triplets: int = 2000, cache: str = ".cache/measure"):
    """The tiny model's editor under `UniKEConfig(seed=seed, **key=value fields)`, fit on
    `SynthWorld(seed=0).triplets(n=triplets, seed=3)` (states cached under `cache`); and the world."""
    config = {k: ast.literal_eval(v) for k, v in (kv.split("=", 1) for kv in fields)}
    torch.set_num_threads(1)
    model, processor = unike.load_tiny()
    world = unike.SynthWorld(seed=0)
    editor = unike.UniKE(model, processor, unike.UniKEConfig(seed=seed, **config))
    path = Path(cache) / f"fit{triplets}-{editor.config.latent_read}.pt"
    states = torch.load(path, weights_only=False) if path.exists() else None
    if states is None or not getattr(states, "words", None):     # (collected before the prompts' words were kept)
        states = editor.collect(world.triplets(n=triplets, seed=3))
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(states, path)
    editor.fit_states(states)
    return editor, world


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, kind in (("task", str), ("mode", str), ("k", int), ("n", int), ("seed", int)):
        ap.add_argument(name, type=kind)
    ap.add_argument("config", nargs="*", help="UniKEConfig fields as key=value (Python literals)")
    ap.add_argument("--safe", action="store_true", help="sequence-safe edit lists")
    ap.add_argument("--protocol", default="exact")
    ap.add_argument("--triplets", type=int, default=2000)
    ap.add_argument("--alpha", type=int, default=0, help="also α against relevance over this many other cases")
    ap.add_argument("--cache", default=".cache/measure", help="folder for the fit states")
    args = ap.parse_intermixed_args()   # key=value fields before or after the options
    editor, world = fitted(args.config, args.seed, args.triplets, args.cache)
    model, processor = editor.model, editor.processor
    setup = Setup(model, processor, "tiny", world, sequence_safe=args.safe or None)
    cases = setup.cases(args.task, args.n, args.seed, args.k)    # task cross: half VQA, half captions per K
    for protocol in args.protocol.split(","):
        start = time.time()
        scores = unike.evaluate(editor, cases, protocol, mode=args.mode, k=args.k)
        five = sum(scores[m] for m in FIVE) / len(FIVE)
        print(protocol, " ".join(f"{m}={v:.1f}" for m, v in scores.items()), f"mean5={five:.1f}",
              f"({time.time() - start:.0f} s)")
    if args.alpha:
        record = alpha_points(editor, world.edit_cases(args.task, n=args.alpha, seed=args.seed + 100))
        for (layer, kind), row in summary(record).items():
            print("alpha", layer, kind, {k: round(v, 3) for k, v in row.items()})


if __name__ == "__main__":
    main()
