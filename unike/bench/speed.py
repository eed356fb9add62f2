"""`unike bench --speed`: forward overhead, edit latency over a long sequence, and the size of an edit.

* **Overhead**: forward time of a fixed teacher-forced batch through the model with UniKE attached,
  divided by the plain model's (an identical deep copy): timed in one process, plain and edited
  forwards alternating in adjacent pairs (order swapped every repeat) after a warm-up, under
  `torch.inference_mode`; the median of the per-pair ratios. Measured at 0 edits (hooks only); then
  with `edits` real edits (cases other than the probe batch) on an editor fitted on real triplets, its
  `memory`-entry memory per layer filled with random fitted entries (the cost depends on how many tokens
  the relevance gate lets retrieve, and on how many of the edits' neurons fire); the same with the
  memory off; and, the worst case, the gate off, so that every token retrieves.
* **Latency**: one sequence of `edits` real edits, each trained for the config's `edit_steps` (or
  `steps`) with the early stop off, so every edit does the same work; then 10 more cases, each edited
  after the sequence and, in the adjacent run, as edit #1 by a twin editor of the same fitted state: the
  ratio is the median per-pair ratio (the sequence's last 10 over its first 10 is kept as
  `sequence_ratio`: other cases, minutes apart). Fewer steps than the default leave edits half trained, their neurons
  firing on most tokens: that measures a state no real sequence reaches.
* **Size of an edit**: exact element and byte counts that one real edit adds to the editor's state.
"""
from __future__ import annotations

import copy
import statistics
import tempfile
import time

import torch
from tqdm.auto import tqdm

from ..config import UniKEConfig
from ..data.case import load_image
from ..editor import UniKE
from ..locate import locate
from ..prompting import collate, encode, on_model, pad_id_of
from .runs import Setup, sync

TARGETS = {"overhead_0_edits": 1.02, "overhead_100_edits": 1.10, "latency_ratio": 1.2}  # issue #6, mid-size config
TARGET_MID, TARGET_LATENCY_EDITS = (1024, 8), 1000      # the sizes the targets are stated for


def probe_batch(model, processor, cases, size: int) -> dict:
    """A fixed batch: the first `size` cases' prompt + target, right padded, without labels."""
    encs = [encode(processor, load_image(c.image), c.prompt, c.target) for c in cases[:size]]
    batch = on_model(collate(encs, pad_id_of(processor), side="right"), model)
    batch.pop("labels")
    return batch


def timed_forward(model, inputs) -> float:
    sync()
    t0 = time.perf_counter()
    model(**inputs)
    sync()
    return time.perf_counter() - t0


@torch.inference_mode()
def overhead(plain, edited, inputs, repeats: int = 20, warmup: int = 3, desc: str | None = None) -> dict:
    """Median forward seconds of `plain` and `edited`, timed in adjacent pairs (order swapped every
    repeat), and the overhead: the median over pairs of edited ÷ plain (adjacent timings share the
    machine's drift, so the paired ratio is steadier than a ratio of medians on a busy machine)."""
    for _ in range(warmup):
        timed_forward(plain, inputs), timed_forward(edited, inputs)
    times = {"plain": [], "edited": []}
    for i in tqdm(range(repeats), desc=desc, disable=desc is None, leave=False):
        order = (("plain", plain), ("edited", edited)) if i % 2 == 0 else (("edited", edited), ("plain", plain))
        for name, model in order:
            times[name].append(timed_forward(model, inputs))
    ratios = [e / p for e, p in zip(times["edited"], times["plain"])]
    return {"plain_s": statistics.median(times["plain"]), "edited_s": statistics.median(times["edited"]),
            "ratio": statistics.median(ratios), "repeats": repeats}


@torch.no_grad()
def fill(editor: UniKE, edits: int = 0, memory: int = 0, seed: int = 0, fitted: bool = True) -> None:
    """Add `edits` edits' worth of random neurons and `memory` random memory entries to every layer: fitted
    ones (placed in the index as it is; the editor holds no edit entries) or, `fitted=False`, edits'."""
    gen = torch.Generator().manual_seed(seed)
    d, n = editor.stack.hidden_size, editor.config.n_neurons
    for l in editor.layer_ids:
        patch = editor.neurons[l]
        dev = patch.keys.device
        for _ in range(edits):
            patch.begin(torch.randn(d, n, generator=gen).to(dev) / d ** 0.5, torch.randn(n, generator=gen).to(dev))
            patch.pending["v"].copy_(torch.randn(n, d, generator=gen))
            patch.commit()
            if l == editor.layer_ids[0]:      # routed everywhere: every synthetic edit is computed (the worst case)
                editor.router.add(torch.zeros(1, d), None, everywhere=True)
        if memory:
            editor.memory[l].add(*(torch.randn(memory, d, generator=gen) for _ in range(3)), fitted=fitted)


def mid_model(hidden: int = 1024, layers: int = 8, seed: int = 0):
    """The tiny model's LLaVA config with a wider, deeper text decoder (random weights, offline); it
    takes the tiny processor's inputs."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    from ..tiny import WEIGHTS

    cfg = AutoConfig.from_pretrained(WEIGHTS)
    t = cfg.text_config
    heads = max(1, hidden // 64)
    t.hidden_size, t.intermediate_size, t.num_hidden_layers = hidden, 4 * hidden, layers
    t.num_attention_heads = t.num_key_value_heads = heads
    t.head_dim = hidden // heads
    torch.manual_seed(seed)
    return AutoModelForImageTextToText.from_config(cfg).eval()


@torch.no_grad()
def retrieving(editor: UniKE, model, inputs) -> float:
    """The fraction of (token, edited layer) pairs that retrieve in one forward (the others are pruned)."""
    model(**inputs)
    done, total = (sum(m.retrieved[i] for m in editor.memory.values()) for i in (0, 1))
    return done / max(1, total)


def overheads(model, processor, inputs, *, edits: int, memory: int, repeats: int, seed: int = 0,
              triplets=None, cases=None, progress: bool = True) -> dict:
    """Overhead at 0 edits; with `edits` edits and a `memory`-entry memory per edited layer; the same with
    the memory switched off (the neurons alone); and the worst case, the gate off so that every token
    retrieves. Given fit `triplets` and edit `cases`, the memory is fitted on the triplets (this model's
    states, the gate calibrated) and filled with random fitted entries up to `memory` (entries far from
    every token, as most of a large memory is from any one token), and the edits are real (`editor.edit`,
    which also writes their entries). Otherwise the neurons are random (N(0, 1) biases: half of them fire on
    any token, far more than real edits' do) and the memory is random with the gate off."""
    plain = copy.deepcopy(model)
    layers = min(UniKEConfig.layers, len(locate(model)))     # the default last 4 (all of a shallower decoder)
    editor = UniKE(model, processor, UniKEConfig(seed=seed, layers=layers))
    extra = {}

    def timed(name: str) -> dict:
        return overhead(plain, model, inputs, repeats, desc=f"timing {name}" if progress else None)

    try:
        out = {"0_edits": timed("0_edits")}
        if triplets:
            editor.fit(triplets, progress=progress)
            extra["fit_triplets"] = len(triplets)
        # random fitted entries up to `memory` (without triplets the gate is off: every token retrieves)
        fill(editor, memory=max(0, memory - len(triplets or ())), seed=seed)
        if triplets and cases:
            for case in tqdm(cases[:edits], desc=f"{edits} real edits", disable=not progress):
                editor.edit(case)
            extra["real_edits"] = editor.n_edits
        else:
            fill(editor, edits=edits, seed=seed)
        out[f"{edits}_edits_{memory}_memory"] = timed(f"{edits}_edits_{memory}_memory")
        extra["retrieving"] = retrieving(editor, model, inputs)
        editor.config.latent = False
        out[f"{edits}_edits_no_memory"] = timed(f"{edits}_edits_no_memory")
        editor.config.latent = True
        for mem in editor.memory.values():
            mem.min_similarity.fill_(-1.0)
        out[f"{edits}_edits_{memory}_memory_every_token"] = timed(f"{edits}_edits_{memory}_memory_every_token")
    finally:
        editor.detach()
    return {"settings": out, "batch": list(inputs["input_ids"].shape),
            "hidden": editor.stack.hidden_size, "layers": len(editor.stack), "edited_layers": editor.layer_ids,
            "params": sum(p.numel() for p in model.parameters()), "n_neurons": editor.config.n_neurons, **extra}


def state_sizes(editor: UniKE) -> dict[str, tuple[int, int]]:
    """(elements, bytes) of every tensor of the editor's state."""
    return {k: (v.numel(), v.numel() * v.element_size()) for k, v in editor.state().items()}


def added_per_edit(before: dict, after: dict) -> dict:
    """What one edit added, by part: neurons (K, b, V, ζ′: parameters added to the model), memory entries,
    and the FFN inputs kept as negatives for later edits (bookkeeping, not used in the forward pass)."""
    parts = {"neurons": 0, "memory": 0, "edited": 0}
    nbytes = dict(parts)
    for k, (n, b) in after.items():
        part = k.split(".")[2] if k.startswith("layers.") else k      # layers.<l>.<part>.…
        if part in parts:
            parts[part] += n - before.get(k, (0, 0))[0]
            nbytes[part] += b - before.get(k, (0, 0))[1]
    return {"params": parts["neurons"], "memory_floats": parts["memory"], "bookkeeping_floats": parts["edited"],
            "bytes": sum(nbytes.values()), "bytes_by_part": nbytes}


def timed_edits(editor: UniKE, cases, desc: str, progress: bool = True, on_first=None) -> list[float]:
    """Seconds of each edit of `cases`, in order (`on_first(before)` after the first, with the state sizes
    from before it)."""
    seconds = []
    for i, case in enumerate(tqdm(cases, desc=desc, disable=not progress)):
        before = state_sizes(editor) if i == 0 and on_first else None
        sync()
        t0 = time.perf_counter()
        editor.edit(case)
        sync()
        seconds.append(time.perf_counter() - t0)
        if before is not None:
            on_first(before)
    return seconds


@torch.no_grad()
def fill_negatives(editor: UniKE, rows_per_edit: float, edits: int, seed: int = 0) -> None:
    """Random stand-ins for the FFN inputs that `edits` earlier edits keep as negatives."""
    gen = torch.Generator().manual_seed(seed)
    for layer in editor.layers.values():
        kept = layer.edited
        extra = torch.randn(round(rows_per_edit * edits), kept.shape[1], generator=gen) * kept.std()
        layer.edited = torch.cat([kept, extra.to(kept)])


def paired_edits(editor: UniKE, fresh: UniKE, cases, desc: str, progress: bool = True) -> dict:
    """Each case edited twice in adjacent runs (order swapped every pair): by `editor` after its edits, and by
    `fresh` (the same fitted state, no edit; reset after each) as an edit #1. Per-pair ratios cancel what
    the CPU does over a long sequence and what the cases differ in."""
    seconds, first = [], []
    for i, case in enumerate(tqdm(cases, desc=desc, disable=not progress)):
        order = [(editor, seconds), (fresh, first)]
        for ed, out in order if i % 2 == 0 else order[::-1]:
            out += timed_edits(ed, [case], desc, progress=False)
        fresh.reset()
    ratios = [s / f for s, f in zip(seconds, first)]
    return {"ratio": statistics.median(ratios), "median_s": statistics.median(seconds),
            "first_median_s": statistics.median(first), "seconds": [round(s, 4) for s in seconds],
            "first_seconds": [round(s, 4) for s in first]}


def edit_latency(setup: Setup, triplets, *, edits: int, steps: int | None = None, at: int | None = None,
                 seed: int = 0, progress: bool = True) -> dict:
    """Seconds of each edit in one sequence of `edits` real edits (`steps` each; default: the config's
    `edit_steps`) and the size of the first edit. The ratio: `m` (≤ 10) more cases, each edited after the
    sequence and, in the adjacent run, as edit #1 by a twin editor of the same fitted state
    (`paired_edits`): the median per-pair ratio. `sequence_ratio` is the median of the sequence's last `m`
    edits over its first `m` (other cases, minutes apart). With `at` > `edits`, the sequence then jumps to
    edit number `at`: the state of the edits in between is filled with random tensors of the real shapes
    (neurons, memory entries, kept negatives at the measured rate) and `m` more cases are timed the same
    paired way ("filled": what edit number `at` costs, without running every edit before it)."""
    # a probability never exceeds 2: no early stop
    cfg = UniKEConfig(seed=seed, stop_prob=2.0, **({} if steps is None else {"edit_steps": steps}))
    task = "vqa" if setup.world is not None or "vqa" in setup.data else sorted(setup.data)[0]
    m = min(10, max(1, edits // 2))
    need = edits + 2 * m if at and at >= edits + 2 * m else edits + m
    pool = setup.task_cases(task, need if setup.world is not None else min(need, len(setup.data[task])), seed)
    pick = lambda i: pool[i % len(pool)]                                      # noqa: E731
    twin = copy.deepcopy(setup.model)
    editor = UniKE(setup.model, setup.processor, cfg)
    fresh = None
    try:
        editor.fit(triplets, progress=progress)
        with tempfile.TemporaryDirectory() as tmp:
            editor.save(tmp)
            fresh = UniKE.load(twin, setup.processor, tmp)
        size = {}
        first_size = lambda before: size.update(added_per_edit(before, state_sizes(editor)))  # noqa: E731
        seconds = timed_edits(editor, [pick(i) for i in range(edits)], f"{edits} sequential edits",
                              progress, on_first=first_size)
        first, last = statistics.median(seconds[:m]), statistics.median(seconds[-m:])
        paired = paired_edits(editor, fresh, [pick(edits + i) for i in range(m)],
                              f"edits {edits + 1}..{edits + m} beside edit #1", progress)
        out = {"ratio": paired["ratio"], "edits": edits, "edit_steps": cfg.edit_steps, "early_stop": False,
               "window": m, "paired": paired, "sequence_ratio": last / first, "first_median_s": first,
               "last_median_s": last, "seconds": [round(s, 4) for s in seconds], "per_edit": size or None,
               "model": setup.label}
        if at and at >= edits + 2 * m:
            skipped = at - edits - 2 * m
            rows = len(editor.layers[editor.layer_ids[0]].edited) / (edits + m)
            fill(editor, edits=skipped, memory=skipped, seed=seed, fitted=False)
            fill_negatives(editor, rows, skipped, seed=seed)
            tail = paired_edits(editor, fresh, [pick(edits + m + i) for i in range(m)],
                                f"edits {at - m + 1}..{at} (after filling) beside edit #1", progress)
            out["filled"] = {"at": at, **tail,
                             "how": f"{edits + m} real edits, then the neurons, memory entries and kept negatives "
                                    f"of {skipped} more edits filled with random tensors of the real shapes, then "
                                    f"{m} real edits, each beside an edit #1 of the same case"}
        return out
    finally:
        editor.detach()
        if fresh is not None:
            fresh.detach()


def speed(setup: Setup, triplets, runs: list[dict], *, seed: int = 0, mid: tuple[int, int] = (1024, 8),
          edits: int = 100, memory: int = 15000, latency_edits: int = 1000, latency_steps: int | None = None,
          latency_at: int | None = None, repeats: int = 20, batch: int = 4, fit: int = 2000,
          progress: bool = True) -> dict:
    """Every speed figure of one invocation (see the module docstring)."""
    total = batch + edits if setup.world is not None else min(batch + edits, len(setup.data.get("vqa", ())))
    cases = setup.task_cases("vqa", total, seed)           # a probe batch, then the cases to edit
    models = {setup.label: (setup.model, setup.processor)}
    if setup.world is not None:
        models["mid"] = (mid_model(*mid, seed=seed), setup.processor)
    detail = {}
    for label, (model, processor) in tqdm(models.items(), desc="forward overhead", disable=not progress):
        detail[label] = overheads(model, processor, probe_batch(model, processor, cases, batch), edits=edits,
                                  memory=memory, repeats=repeats, seed=seed, triplets=triplets[:fit],
                                  cases=cases[batch:], progress=progress)
    models.pop("mid", None)
    latency = edit_latency(setup, triplets, edits=latency_edits, steps=latency_steps, at=latency_at, seed=seed,
                           progress=progress)
    full = f"{edits}_edits_{memory}_memory"
    out = {
        "overhead_0_edits": {k: v["settings"]["0_edits"]["ratio"] for k, v in detail.items()},
        f"overhead_{edits}_edits": {k: v["settings"][full]["ratio"] for k, v in detail.items()
                                    if full in v["settings"]},
        "overhead": detail,
        f"overhead_{edits}_edits_every_token": {k: v["settings"][f"{full}_every_token"]["ratio"]
                                                for k, v in detail.items()},
        "overhead_fill": (f"{edits} real edits (other cases than the probe batch; their neurons and memory entries) "
                          f"on an editor fitted on {min(fit, len(triplets))} triplets (this model's states, the "
                          f"relevance gate calibrated), its memory filled with random fitted entries up to {memory} "
                          f"per edited layer; 'no_memory': the same with the memory off; 'every_token': the gate "
                          f"off, so every token retrieves"),
        f"latency_ratio_{latency_edits}_vs_1": latency["ratio"],
        "latency": latency,
        **({f"latency_ratio_{latency['filled']['at']}_vs_1_filled": latency["filled"]["ratio"]}
           if "filled" in latency else {}),
        "params_per_edit": latency["per_edit"]["params"] if latency["per_edit"] else None,
        "bytes_per_edit": latency["per_edit"]["bytes"] if latency["per_edit"] else None,
        "seconds_per_edit": seconds_per_edit(runs),
        "targets": {k: v for k, v in TARGETS.items()   # only those stated for the sizes measured
                    if (tuple(mid) == TARGET_MID if k.startswith("overhead")
                        else max(latency_edits, latency_at or 0) >= TARGET_LATENCY_EDITS)},
        "mid_config": {"hidden": mid[0], "layers": mid[1]},
    }
    return out


def seconds_per_edit(runs: list[dict]) -> dict[str, float]:
    """Mean seconds per edit of each method over its one-step runs (all its runs if it has none)."""
    out = {}
    for name in dict.fromkeys(r["method"] for r in runs):
        mine = [r for r in runs if r["method"] == name]
        picked = [r for r in mine if r["mode"] == "one-step"] or mine
        out[name] = sum(r["seconds_per_edit"] for r in picked) / len(picked)
    return out
