"""Command line: `unike demo`, `unike bench`, `unike layers`, `unike train-tiny`."""
from __future__ import annotations

import argparse
import sys
import time


def demo(args) -> None:
    """Load the shipped tiny VLM, answer a rendered image's questions, edit one fact, show before/after."""
    import unike

    t0 = time.time()
    model, processor = unike.load_tiny()
    world = unike.SynthWorld(seed=0)
    print(unike.locate(model).describe())
    case = world.edit_cases("vqa", n=1, seed=args.seed)[0]
    ask = lambda image, prompt: unike.answer(model, processor, image, prompt)  # noqa: E731
    probes = [("edit", case.image, case.prompt), ("rephrased question", case.image, case.rephrase_prompt),
              ("another rendering", case.rephrase_image, case.prompt),
              ("same image, other fact", case.image, case.ci_prompt),
              ("other entity, same question", case.ri_image, case.prompt), ("text only", None, case.loc_prompt)]
    before = [ask(im, p) for _, im, p in probes]
    editor = unike.UniKE(model, processor)
    editor.fit(world.triplets(n=args.triplets, seed=args.seed), progress=True)
    t1 = time.time()
    editor.edit(case)
    t_edit = time.time() - t1
    after = [ask(im, p) for _, im, p in probes]
    print(f"\nedit: {case.prompt!r}: {case.ground_truth!r} -> {case.target!r}  ({t_edit:.2f} s)\n")
    width = max(len(p) for _, _, p in probes)
    print(f"{'probe':28s} {'prompt':{width}s}  before -> after")
    for (name, _, prompt), b, a in zip(probes, before, after):
        print(f"{name:28s} {prompt:{width}s}  {b} -> {a}")
    editor.detach()
    print(f"\ndetached; the model is unchanged: {ask(case.image, case.prompt)!r}   total {time.time() - t0:.1f} s")


def layers(args) -> None:
    """Print the located text-decoder layer map of a model folder's config (or of the tiny model)."""
    import unike

    if args.model:
        import torch
        from transformers import AutoConfig, AutoModelForImageTextToText

        with torch.device("meta"):      # the structure only: no weight is read, so any size fits
            model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(args.model))
    else:
        model, _ = unike.load_tiny()
    stack = unike.locate(model, layers=args.layers)
    print(stack.describe())
    n, last = len(stack), unike.UniKEConfig().layers
    print(f"UniKE edits the last {last} by default: layers {list(range(max(0, n - last), n))}; choose others with "
          f"UniKEConfig(layers=<count or list of indices in 0..{n - 1}>)"
          + (f", and pass layers_path={args.layers!r}" if args.layers else ""))


def bench(args) -> None:
    """Run editing methods on edit cases; write results.json, the Markdown tables and the plots."""
    from .bench import main as bench_main

    bench_main(args)


def train_tiny(args) -> None:
    from .tiny.train import main as train_main

    train_main(args.rest)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="unike", description="UniKE multimodal knowledge editing.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="edit one fact of the shipped tiny VLM and show before/after")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--triplets", type=int, default=2000)
    p.set_defaults(func=demo)
    p = sub.add_parser("bench", help="benchmark UniKE, its ablations and the baselines (tables, plots, speed)")
    from .bench import add_arguments

    add_arguments(p)
    p.set_defaults(func=bench)
    p = sub.add_parser("layers", help="print the located text-decoder layers of a model")
    p.add_argument("--model", default=None, help="a local model folder (default: the tiny model)")
    p.add_argument("--layers", default=None, help="dotted path override, e.g. model.language_model.layers")
    p.set_defaults(func=layers)
    p = sub.add_parser("train-tiny", help="train the embedded tiny VLM (options: see --help after it)",
                       add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=train_tiny)
    args, unknown = parser.parse_known_args(argv)  # train-tiny's options go to its own parser
    if args.command == "train-tiny":
        args.rest = unknown + args.rest
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
