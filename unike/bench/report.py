"""The Markdown report of a `results.json`: the paper's Tables 1–4 and Fig. 4 layout, our rows beside
the paper's (MiniGPT-4), the harder locality probes (CI-Loc, RI-Loc) beside the classic five, α against
relevance and the speed figures. A pure function of the results, so it can be regenerated any time."""
from __future__ import annotations

from . import paper
from .methods import ABLATIONS, ALPHAS, MAIN, ZETAS

FIVE = ("rel", "t_gen", "m_gen", "t_loc", "m_loc")
HARD = ("ci_loc", "ri_loc")
HEAD = {"rel": "Rel", "t_gen": "T-Gen", "m_gen": "M-Gen", "t_loc": "T-Loc", "m_loc": "M-Loc",
        "ci_loc": "CI-Loc", "ri_loc": "RI-Loc", "port": "Port"}
NAMES = {"base": "Base model", "ftlast": "FT (last layer)", "tpatcher": "T-Patcher", "grace": "GRACE",
         "promptike": "IKE (prompt)", "latentike": "Latent IKE", "unike": "**UniKE**", "intrin-only": "1 only Intrin",
         "latent-only": "2 only Latent-IKE", "intrin+prompt-ike": "3 Intrin + IKE (prompt)",
         "no-collab": "4 Intrin + Latent-IKE (no collaboration)", "zeta-none": "no ζ", "zeta-random": "random ζ",
         "zeta-semantic": "semantic ζ"}
TASK_TITLES = {"vqa": "E-VQA-style (task vqa)", "caption": "E-IC-style (task caption)",
               "text": "text-only facts, ZsRE-style (task text; no image, so no M-Gen, CI-Loc or RI-Loc)"}


def name_of(method: str) -> str:
    if method.startswith("alpha-"):
        return f"fixed α = {method.split('-', 1)[1]}"
    return NAMES.get(method, method)


def fmt(value) -> str:
    return "–" if value is None else f"{value:.1f}"


def mean5(scores: dict) -> float | None:
    vals = [scores.get(m) for m in FIVE]
    return None if any(v is None for v in vals) else sum(vals) / len(vals)


def source(run: dict) -> str:
    after = " · scored after each edit" if run.get("score_after") == "each" else ""
    safe = " · sequence-safe lists" if run.get("sequence_safe") else ""
    return f"{run['model']} · {run['protocol']}{after}{safe} · n={run['n']} · seed {run['seed']}"


def paper_source(task: str) -> str:
    return f"paper, {paper.MODEL}, {paper.TASK_NAMES[task]}"


def full_table(rows: list[tuple[str, str, dict, float | None]]) -> str:
    """| method | source | five metrics | mean of 5 | CI-Loc | RI-Loc | s/edit |"""
    head = ["method", "source", *(HEAD[m] for m in FIVE), "mean of 5", *(HEAD[m] for m in HARD), "s/edit"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, src, scores, spe in rows:
        cells = [name_of(method), src, *(fmt(scores.get(m)) for m in FIVE), fmt(mean5(scores)),
                 *(fmt(scores.get(m)) for m in HARD), "–" if spe is None else f"{spe:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def gen_loc_table(rows: list[tuple[str, str, dict]]) -> str:
    """Fig. 4 layout: Rel, generality (mean of T/M-Gen), locality (mean of T/M-Loc), CI-Loc, RI-Loc."""
    head = ["method", "source", "Rel", "Gen", "Loc", "CI-Loc", "RI-Loc"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, src, s in rows:
        gen = (s["t_gen"] + s["m_gen"]) / 2 if "t_gen" in s and "m_gen" in s else s.get("gen")
        loc = (s["t_loc"] + s["m_loc"]) / 2 if "t_loc" in s and "m_loc" in s else s.get("loc")
        lines.append("| " + " | ".join([name_of(method), src, fmt(s.get("rel")), fmt(gen), fmt(loc),
                                        fmt(s.get("ci_loc")), fmt(s.get("ri_loc"))]) + " |")
    return "\n".join(lines)


def select(runs: list[dict], **want) -> list[dict]:
    return [r for r in runs if all(r.get(k) == v for k, v in want.items())]


def rows_for(runs: list[dict], order, reference: dict, task: str) -> list[tuple]:
    """Our rows in `order`, each followed by the paper's row for the same method if it has one."""
    rows = []
    for method in order:
        mine = select(runs, method=method)
        for r in mine:
            rows.append((method, source(r), r["scores"], r.get("seconds_per_edit")))
        if mine and method in reference:
            rows.append((method, paper_source(task), reference[method], None))
    return rows


def others(runs: list[dict], known) -> list[str]:
    return [m for m in dict.fromkeys(r["method"] for r in runs) if m not in known]


def one_step(runs: list[dict]) -> str:
    parts = []
    for task in ("vqa", "caption", "text"):
        rs = select(runs, mode="one-step", task=task)
        rows = rows_for(rs, MAIN + tuple(others(rs, MAIN)) if task == "text" else MAIN, paper.ONE_STEP.get(task, {}),
                        task)
        if rows:
            parts.append(f"### Table 1 — one-step editing, {TASK_TITLES[task]}\n\n{full_table(rows)}")
    return "\n\n".join(parts)


def sequential(runs: list[dict]) -> str:
    parts = []
    for task in ("vqa", "caption", "text"):
        rs = select(runs, mode="sequential", task=task)
        for k in sorted({r["k"] for r in rs}):
            order = MAIN + tuple(others(rs, MAIN))
            rows = rows_for(select(rs, k=k), order, paper.SEQUENTIAL.get((task, k), {}), task)
            parts.append(f"### Table 2 — sequential editing, {TASK_TITLES[task]}, K = {k}\n\n{full_table(rows)}")
    return "\n\n".join(parts)


def cross(runs: list[dict]) -> str:
    parts = []
    rs = select(runs, task="cross")
    for k in sorted({r["k"] for r in rs}):
        order = MAIN + tuple(others(rs, MAIN))
        rows = rows_for(select(rs, k=k), order, paper.CROSS if k == 10 else {}, "cross")
        parts.append(f"### Table 3 — cross-task editing, K = {k} (half VQA, half caption per sequence)\n\n"
                     f"{full_table(rows)}")
    return "\n\n".join(parts)


def ablation(runs: list[dict]) -> str:
    parts = []
    for task in ("vqa", "caption"):
        rs = select(runs, mode="one-step", task=task)
        if not any(r["method"] in ABLATIONS for r in rs):
            continue
        rows = rows_for(rs, ABLATIONS + ("unike",), paper.ABLATION[task], task)
        parts.append(f"### Table 4 — ablation (one-step), {TASK_TITLES[task]}\n\n{full_table(rows)}")
    return "\n\n".join(parts)


def fig4(runs: list[dict]) -> str:
    parts = []
    for title, variants, reference in (("Fig. 4b — fixed α against the dynamic α", ALPHAS, {}),
                                       ("Fig. 4c — the truthfulness direction ζ", ZETAS, paper.ZETA)):
        for task in ("vqa", "caption"):
            rs = select(runs, mode="one-step", task=task)
            extra = [m for m in others(rs, ()) if m.startswith("alpha-")] if variants is ALPHAS else []
            order = tuple(dict.fromkeys(variants + tuple(sorted(extra)))) + ("unike",)
            if not any(r["method"] in order[:-1] for r in rs):
                continue
            rows = [(m, source(r), r["scores"]) for m in order for r in select(rs, method=m)]
            if task == "vqa":
                rows += [(m, paper_source("vqa"), v) for m, v in reference.items()]
            parts.append(f"### {title}, {TASK_TITLES[task]}\n\nGen = mean of T-Gen and M-Gen, Loc = mean of "
                         f"T-Loc and M-Loc (the paper's Fig. 4 axes); UniKE = dynamic α, truthful ζ.\n\n"
                         f"{gen_loc_table(rows)}")
    return "\n\n".join(parts)


def alpha(records: list[dict]) -> str:
    from .alpha import summary

    if not records:
        return ""
    lines = ["### α against relevance (UniKE, one-step)", "",
             "α at the question-final token of each probe prompt, every edited layer, after the probe's own edit. "
             "Relevant = rel, t_gen, m_gen probes; unrelated = t_loc, m_loc, ci_loc, ri_loc. "
             "Open = share of tokens with α > 0 (the relevance gate lets them through).", "",
             "| task | source | layer | probes | mean best match | gate | mean α | open | count |",
             "|---|---|---|---|---|---|---|---|---|"]
    for rec in records:
        for (layer, kind), s in summary(rec).items():
            lines.append(f"| {rec['task']} | {rec['model']} · seed {rec['seed']} | {layer} | {kind} | "
                         f"{s['cosine']:.3f} | {rec['gate'][str(layer)]:.3f} | {s['mean_alpha']:.3f} | "
                         f"{100 * s['open']:.0f}% | {s['count']} |")
    return "\n".join(lines)


def speed(sp: dict) -> str:
    if not sp:
        return ""
    targets = sp.get("targets", {})
    lines = ["### Speed", "", "| figure | model | value | target |", "|---|---|---|---|"]
    detail = sp.get("overhead", {})
    label = lambda m: f"{m} ({detail[m]['hidden']}×{detail[m]['layers']})" if m in detail else m  # noqa: E731
    for key in [k for k in sp if k.startswith("overhead_") and isinstance(sp[k], dict) and k != "overhead_fill"]:
        for model, value in sp[key].items():
            target = targets.get(key) if model == "mid" else None
            lines.append(f"| {key} (forward time ÷ plain model) | {label(model)} | {value:.3f} | "
                         f"{'≤ ' + str(target) if target else '–'} |")
    lat = sp.get("latency")
    bound = f"≤ {targets['latency_ratio']}" if "latency_ratio" in targets else "–"
    if lat:
        pairs = "each of {m} more cases edited after {n} edits ÷ the same case as edit #1 beside it, median"
        lines.append(f"| latency_ratio_{lat['edits']}_vs_1 ({pairs.format(m=lat['window'], n=lat['edits'])}; "
                     f"{lat['edit_steps']} steps each) | {lat['model']} | {lat['ratio']:.2f} | {bound} |")
        if "sequence_ratio" in lat:
            lines.append(f"| the sequence's last {lat['window']} ÷ its first {lat['window']} edits (other cases, "
                         f"minutes apart) | {lat['model']} | {lat['sequence_ratio']:.2f} | – |")
        filled = lat.get("filled")
        if filled:
            lines.append(f"| latency_ratio_{filled['at']}_vs_1_filled ({filled['how']}) | {lat['model']} | "
                         f"{filled['ratio']:.2f} | {bound} |")
        size = lat.get("per_edit") or {}
        if size:
            lines.append(f"| parameters added per edit (neurons K, b, V, ζ′) | {lat['model']} | "
                         f"{size['params']:,} | – |")
            lines.append(f"| memory floats added per edit | {lat['model']} | {size['memory_floats']:,} | – |")
            lines.append(f"| bytes added per edit (all state, incl. {size['bookkeeping_floats']:,} bookkeeping "
                         f"floats) | {lat['model']} | {size['bytes']:,} | – |")
    for method, s in sp.get("seconds_per_edit", {}).items():
        lines.append(f"| seconds per edit, {name_of(method)} | {lat['model'] if lat else ''} | {s:.2f} | – |")
    if sp.get("overhead_fill"):
        lines += ["", f"Overhead buffers: {sp['overhead_fill']}. Details (batch shape, plain and edited medians) "
                      "are in results.json under speed.overhead."]
    return "\n".join(lines)


def markdown(results: dict, title: str = "unike bench results") -> str:
    runs = results.get("runs", [])
    sections = [one_step(runs), sequential(runs), cross(runs), ablation(runs), fig4(runs),
                alpha(results.get("alpha", [])), speed(results.get("speed", {}))]
    intro = (f"# {title}\n\nScores in % (protocol in each row's source); higher is better. Paper rows: "
             f"{paper.MODEL} on MMEdit, as reported (no CI-Loc / RI-Loc there). Mean of 5 = mean of Rel, T-Gen, "
             "M-Gen, T-Loc, M-Loc. s/edit = wall-clock seconds per edit in that run.")
    return "\n\n".join([intro] + [s for s in sections if s]) + "\n"
