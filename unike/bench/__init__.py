"""`unike bench`: editing methods on edit cases → `results.json`, the paper-layout Markdown tables and plots.

    python -m unike.cli bench --methods unike,tpatcher --task vqa,caption --n 50 --out out/
    python -m unike.cli bench --methods unike --mode sequential --k 1,10,20 --n 20 --out out/ --append
    python -m unike.cli bench --methods unike --speed --out out/ --append

Modules: `methods` (the registry), `runs` (setup, runs, results.json), `alpha` (α against relevance),
`speed`, `report` (Markdown), `plots`, `paper` (the paper's numbers).
"""
from __future__ import annotations

import platform
from pathlib import Path

import torch

from .methods import expand
from .report import markdown
from .runs import bench, check_settings, load, load_setup, merge, save, settings

RESULTS, TABLE, PLOTS = "results.json", "results.md", "plots"


def _list(text: str, kind=str) -> list:
    return [kind(x.strip()) for x in str(text).split(",") if x.strip()]


def meta(setup, args) -> dict:
    import transformers

    from .. import __version__

    return {"unike": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "threads": torch.get_num_threads(),
            "device": str(next(setup.model.parameters()).device),
            "models": {setup.label: {"params": sum(p.numel() for p in setup.model.parameters()),
                                     "source": args.model}}}


def write(results: dict, out, plots: bool = True) -> list[Path]:
    """results.json, results.md and (optionally) the plots into folder `out`."""
    out = Path(out)
    files = [save(results, out / RESULTS)]
    (out / TABLE).write_text(markdown(results))
    files.append(out / TABLE)
    if plots:
        from .plots import plots as draw

        files += draw(results, out / PLOTS)
    return files


def main(args) -> dict:
    """Run `unike bench` from parsed CLI arguments (see `unike.cli`); returns the results written."""
    names = expand(args.methods) if args.methods != "none" else []
    runs = settings(_list(args.task), _list(args.mode), _list(args.k, int), _list(args.protocol),
                    _list(args.score_after))
    if names:
        check_settings(runs, args.n)
    elif not args.speed:
        raise ValueError("--methods none runs nothing; add --speed or name methods")
    if args.sequence_safe and args.model != "tiny":
        raise ValueError("--sequence-safe draws the tiny model's world lists; MMEdit files are used as they are")
    mid = _list(args.mid.replace("x", ","), int)
    if len(mid) != 2:
        raise ValueError(f"--mid takes HIDDENxLAYERS, e.g. 1024x8, not {args.mid!r}")
    if not args.no_plots:
        from .plots import pyplot

        pyplot()                     # matplotlib missing: say so before hours of runs, not after
    out = Path(args.out)
    old = load(out / RESULTS) if args.append else {}
    torch.manual_seed(args.seed)
    setup = load_setup(args.model, _list(args.data or ""), args.image_root, _list(args.fit_data or ""),
                       args.device, args.dtype)
    setup.sequence_safe = True if args.sequence_safe else None
    progress = not args.quiet
    triplets = setup.triplets(args.triplets, args.seed, held_out=args.n)
    new = bench(setup, names, runs, n=args.n, seed=args.seed, triplets=triplets, alpha_cases=args.alpha_cases,
                progress=progress) if names else {"runs": [], "alpha": []}
    if args.speed:
        from .speed import speed

        new["speed"] = speed(setup, triplets, new["runs"], seed=args.seed, mid=tuple(mid), edits=args.speed_fill_edits,
                             memory=args.speed_memory, latency_edits=args.speed_edits, latency_steps=args.speed_steps,
                             latency_at=args.speed_edits_at, fit=args.speed_fit,
                             repeats=args.speed_repeats, batch=args.speed_batch, progress=progress)
    new["meta"] = meta(setup, args)
    results = merge(old, new)
    files = write(results, out, plots=not args.no_plots)
    if progress:
        print("\n".join(f"wrote {f}" for f in files))
    return results


def add_arguments(p) -> None:
    p.add_argument("--model", default="tiny", help="'tiny' (the shipped model and its world), or an HF id or "
                   "folder of an image-text-to-text model (then --data)")
    p.add_argument("--data", default=None, help="MMEdit E-VQA / E-IC JSON file(s), comma separated")
    p.add_argument("--image-root", default=None, help="folder the MMEdit image paths are relative to")
    p.add_argument("--fit-data", default=None, help="MMEdit file(s) whose records become fit triplets (e.g. the "
                   "train split); default: the --data records not evaluated")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default=None, help="e.g. bfloat16 (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--methods", default="main", help="comma list of methods or groups (main, ablations, zeta, "
                   "alpha, all), or 'none'; default: main = base,ftlast,tpatcher,grace,promptike,latentike,unike")
    p.add_argument("--task", default="vqa", help="vqa, caption, cross, text (comma list)")
    p.add_argument("--mode", default="one-step", help="one-step, sequential (comma list)")
    p.add_argument("--k", default="10", help="edits per sequence in sequential mode (comma list, e.g. 1,10,20)")
    p.add_argument("--n", type=int, default=10, help="edit cases per run (a multiple of every K)")
    p.add_argument("--protocol", default="token_acc", help="token_acc, exact, easyedit (comma list; docs/metrics.md)")
    p.add_argument("--score-after", default="all", help="sequential runs: 'all' (every case scored after the K-th "
                   "edit) or 'each' (right after its own edit: EasyEdit's and the UniKE code's rule); comma list")
    p.add_argument("--sequence-safe", action="store_true", help="tiny model: edit lists in which no probe asks "
                   "about a fact another edit of the list changes (version 2's default)")
    p.add_argument("--seed", type=int, default=0, help="seeds the cases, the fit triplets, torch and UniKEConfig")
    p.add_argument("--triplets", type=int, default=200, help="fit triplets per method")
    p.add_argument("--alpha-cases", type=int, default=5, help="one-step UniKE edits for α against relevance (0: off)")
    p.add_argument("--out", default="bench_results", help="output folder")
    p.add_argument("--append", action="store_true", help="merge into an existing OUT/results.json")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--speed", action="store_true", help="also measure overhead, latency and size per edit")
    p.add_argument("--speed-edits", type=int, default=20, help="length of the latency sequence")
    p.add_argument("--speed-edits-at", type=int, default=None, help="also time edit number N after the "
                   "sequence, the state of the edits in between filled with random tensors of the real shapes")
    p.add_argument("--speed-steps", type=int, default=None, help="training steps of every latency edit "
                   "(default: the config's edit_steps)")
    p.add_argument("--speed-fill-edits", type=int, default=3, help="edits' worth of neurons for the overhead")
    p.add_argument("--speed-memory", type=int, default=15000, help="memory entries per layer for the overhead")
    p.add_argument("--speed-fit", type=int, default=64, help="fit triplets whose memory, with random entries up to "
                   "--speed-memory, is timed for the overhead (at most --triplets)")
    p.add_argument("--speed-repeats", type=int, default=20, help="timed forwards per setting")
    p.add_argument("--speed-batch", type=int, default=4, help="prompts in the timed batch")
    p.add_argument("--mid", default="1024x8", help="mid-size random config, HIDDENxLAYERS")
