"""Runs of `unike bench`: the model and cases under test, one evaluation per (method, task, mode, K,
protocol, score_after), timed edits, and the `results.json` they go into (merged across invocations with --append)."""
from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..data.case import EditCase, Triplet
from ..data.world import SynthWorld
from ..metrics import PROTOCOLS, SCORE_AFTER, evaluate
from . import methods as registry

TASKS = ("vqa", "caption", "cross", "text")
MODES = ("one-step", "sequential")
RUN_KEY = ("model", "method", "task", "mode", "k", "n", "protocol", "score_after", "seed", "sequence_safe")


@dataclass
class Setup:
    """The model under test and where its edit cases and fit triplets come from: the tiny model's
    `SynthWorld`, or MMEdit files (`data`: cases per task; `fit_cases`: cases whose (question, target,
    model answer) become fit triplets). `sequence_safe`: the world's lists drawn sequence-safe
    (`SynthWorld.edit_cases`; None: the world version's default)."""

    model: torch.nn.Module
    processor: object
    label: str
    world: SynthWorld | None = None
    data: dict[str, list[EditCase]] = field(default_factory=dict)
    fit_cases: list[EditCase] = field(default_factory=list)
    sequence_safe: bool | None = None

    @property
    def safe_lists(self) -> bool:
        """Whether the edit lists are sequence-safe (the world's, by request or by its version's default)."""
        return self.world is not None and self.world.max_cases("vqa", self.sequence_safe) is not None

    def _pool(self, task: str, seed: int) -> list[EditCase]:
        if task not in self.data:
            raise ValueError(f"no {task} cases: pass an MMEdit {task} file with --data (the file name says "
                             f"'caption' for E-IC)")
        pool = list(self.data[task])
        random.Random(f"{task}-{seed}").shuffle(pool)
        return pool

    def task_cases(self, task: str, n: int, seed: int) -> list[EditCase]:
        """`n` cases of one task (`SynthWorld.edit_cases`, or a seeded sample of the MMEdit file)."""
        if self.world is not None:
            return self.world.edit_cases(task, n=n, seed=seed, sequence_safe=self.sequence_safe)
        pool = self._pool(task, seed)
        if n > len(pool):
            raise ValueError(f"--n {n} exceeds the {len(pool)} {task} cases of --data")
        return pool[:n]

    def cases(self, task: str, n: int, seed: int, k: int = 1) -> list[EditCase]:
        """The cases of a run; task "cross" mixes VQA and caption cases, half and half in every chunk of `k`."""
        if task != "cross":
            return self.task_cases(task, n, seed)
        half = k // 2
        n_vqa = n * half // k
        if self.world is not None:       # sequence-safe lists are safe across the two tasks too
            both = self.world.edit_cases("cross", n, seed, self.sequence_safe, vqa=n_vqa)
            vqa, cap = both[:n_vqa], both[n_vqa:]
        else:
            vqa, cap = self.task_cases("vqa", n_vqa, seed), self.task_cases("caption", n - n_vqa, seed)
        out = []
        for c in range(n // k):
            out += vqa[c * half:(c + 1) * half] + cap[c * (k - half):(c + 1) * (k - half)]
        return out

    def triplets(self, count: int, seed: int, held_out: int = 0) -> list[Triplet]:
        """Fit triplets: `SynthWorld.triplets`, or from MMEdit records as (image, question, right = the
        edit target `alt`, wrong = the model's recorded answer `pred`, else another record's target). With
        no separate fit file, the records after the first `held_out` of each shuffled task are used."""
        if self.world is not None:
            return self.world.triplets(n=count, seed=seed)
        pool = list(self.fit_cases) or [c for t in sorted(self.data) for c in self._pool(t, seed)[held_out:]]
        rng = random.Random(f"triplets-{seed}")
        rng.shuffle(pool)
        out = []
        for i, c in enumerate(pool[:count]):
            wrong = c.ground_truth if c.ground_truth.strip() and c.ground_truth != c.target else \
                pool[(i + 1) % len(pool)].target
            out.append(Triplet(image=c.image, question=c.prompt, right=c.target, wrong=wrong))
        return out


def load_setup(model: str = "tiny", data=(), image_root=None, fit_data=(), device=None, dtype=None) -> Setup:
    """The tiny model with its world, or an HF model (hub id or folder) with MMEdit JSON files."""
    from .. import load_mmedit, load_tiny

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if model == "tiny":
        if data:
            raise ValueError("--data goes with --model (an HF id or folder); the tiny model uses its own world")
        m, p = load_tiny(device=device)
        return Setup(m, p, "tiny", world=SynthWorld(seed=0))
    if not data:
        raise ValueError(f"--model {model} needs --data: one or more MMEdit E-VQA / E-IC JSON files")
    cases: dict[str, list[EditCase]] = {}
    for path in data:
        for c in load_mmedit(path, image_root):
            cases.setdefault(c.task, []).append(c)
    fit_cases = [c for path in fit_data for c in load_mmedit(path, image_root)]
    from transformers import AutoModelForImageTextToText, AutoProcessor

    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    dtype = dtype or (torch.bfloat16 if str(device).startswith("cuda") else torch.float32)
    m = AutoModelForImageTextToText.from_pretrained(model, dtype=dtype).to(device).eval()
    p = AutoProcessor.from_pretrained(model)
    return Setup(m, p, Path(model).name or model, data=cases, fit_cases=fit_cases)


def settings(tasks, modes, ks, protocols, score_after=("all",)) -> list[dict]:
    """Every (task, mode, k, protocol, score_after) to run; one-step runs have k = 1 and score_after "all"
    (the same thing there); task "cross" runs sequentially only."""
    out = []
    for task in tasks:
        for mode in modes:
            if task == "cross" and mode != "sequential":
                continue
            for k in (ks if mode == "sequential" else [1]):
                for protocol in protocols:
                    for after in (score_after if mode == "sequential" else ["all"]):
                        s = {"task": task, "mode": mode, "k": int(k), "protocol": protocol, "score_after": after}
                        if s not in out:
                            out.append(s)
    return out


def check_settings(runs: list[dict], n: int) -> None:
    """Bad settings raise before anything loads."""
    if not runs:
        raise ValueError("nothing to run: task cross runs sequentially (--mode sequential --k 10)")
    for s in runs:
        if s["task"] not in TASKS:
            raise ValueError(f"unknown task {s['task']!r}; choose from {TASKS}")
        if s["mode"] not in MODES:
            raise ValueError(f"unknown mode {s['mode']!r}; choose from {MODES}")
        if s["protocol"] not in PROTOCOLS:
            raise ValueError(f"unknown protocol {s['protocol']!r}; choose from {PROTOCOLS}")
        if s.get("score_after", "all") not in SCORE_AFTER:
            raise ValueError(f"unknown --score-after {s['score_after']!r}; choose from {SCORE_AFTER}")
        if s["k"] < 1 or n % s["k"]:
            raise ValueError(f"--n {n} must be a positive multiple of every K (got K = {s['k']})")
        if s["task"] == "cross" and s["k"] < 2:
            raise ValueError("task cross mixes VQA and caption edits in each sequence: use --k 2 or more "
                             "(the paper uses K = 10)")


class Timed:
    """A method whose edits are timed (wall clock, device synchronised); everything else passes through."""

    def __init__(self, method):
        self.method, self.seconds, self.edits = method, 0.0, 0

    def __getattr__(self, name):
        return getattr(self.method, name)

    def edit(self, case):
        sync()
        t0 = time.perf_counter()
        out = self.method.edit(case)
        sync()
        self.seconds += time.perf_counter() - t0
        self.edits += 1
        return out


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run(method, cases: list[EditCase], *, mode: str, k: int, protocol: str, seed: int, score_after: str = "all",
        progress: bool = True) -> dict:
    """Scores (in %) and seconds per edit of one method on one list of cases."""
    timed = Timed(method)
    torch.manual_seed(seed)
    scores = evaluate(timed, cases, protocol, mode=mode, k=k, score_after=score_after, progress=progress)
    return {"scores": scores, "seconds_per_edit": timed.seconds / max(timed.edits, 1)}


def bench(setup: Setup, names: list[str], runs: list[dict], *, n: int, seed: int = 0, triplets=None,
          alpha_cases: int = 10, progress: bool = True) -> dict:
    """Fit every method once on the same triplets (default: 2000 from the setup) and run every setting
    with it; returns {"runs": [...], "alpha": [...]} (α against relevance for `unike`, one-step tasks)."""
    from .alpha import alpha_points

    check_settings(runs, n)
    fit_set = list(triplets) if triplets is not None else setup.triplets(2000, seed, held_out=n)
    cache: dict[tuple, list[EditCase]] = {}
    records, alphas = [], []
    bar = tqdm(total=len(names) * len(runs), desc="bench runs", disable=not progress)
    for name in names:
        method = registry.build(name, setup.model, setup.processor, seed)
        try:
            t0 = time.perf_counter()
            registry.fit(method, fit_set, seed, progress)
            fit_seconds = time.perf_counter() - t0
            for s in runs:
                bar.set_postfix_str(f"{name} {s['task']} {s['mode']} K={s['k']}")
                key = (s["task"], n, seed, s["k"] if s["task"] == "cross" else 1)
                cases = cache.setdefault(key, setup.cases(*key))
                result = run(method, cases, mode=s["mode"], k=s["k"], protocol=s["protocol"], seed=seed,
                             score_after=s.get("score_after", "all"), progress=progress)
                records.append({"model": setup.label, "method": name, **s, "n": n, "seed": seed,
                                "sequence_safe": setup.safe_lists,
                                "triplets": len(fit_set), "fit_seconds": round(fit_seconds, 3), **result})
                bar.update()
            editor = registry.unike_of(method)
            if name == "unike" and editor is not None and alpha_cases:
                for task in dict.fromkeys(s["task"] for s in runs if s["task"] != "cross"):
                    cases = cache.setdefault((task, n, seed, 1), setup.cases(task, n, seed))
                    alphas.append({"model": setup.label, "method": name, "task": task, "seed": seed,
                                   **alpha_points(editor, cases[:alpha_cases], progress)})
        finally:
            registry.release(method)
    bar.close()
    return {"runs": records, "alpha": alphas}


# ------------------------------------------------------------------------------------------ results.json
def key_of(record: dict, fields=RUN_KEY) -> tuple:
    return tuple(record.get(f) for f in fields)


def merge(old: dict, new: dict) -> dict:
    """`new` over `old`: runs and α records with the same key are replaced, speed figures updated."""
    out = {"runs": [], "speed": {**old.get("speed", {}), **new.get("speed", {})}, "alpha": []}
    for part, fields in (("runs", RUN_KEY), ("alpha", ("model", "method", "task", "seed"))):
        fresh = {key_of(r, fields) for r in new.get(part, [])}
        out[part] = [r for r in old.get(part, []) if key_of(r, fields) not in fresh] + list(new.get(part, []))
    out["meta"] = {**old.get("meta", {}), **new.get("meta", {})}
    return out


def load(path) -> dict:
    path = Path(path)
    if not path.is_file():
        return {"runs": [], "speed": {}, "alpha": []}
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("runs"), list):
        raise ValueError(f"{path} is not a unike bench results.json (no 'runs' list); pass another --out")
    for r in data["runs"]:          # written before score_after existed: every run was scored after all K
        r.setdefault("score_after", "all")
        r.setdefault("sequence_safe", False)   # ... before sequence-safe lists: the version-1 lists
    return data


def save(results: dict, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")
    return path
