"""Text-only edits (no image) on the tiny model: the figures of "Text-only edits: the subject test" in
docs/method.md.

1. the base model's answers to every text fact in its three wordings;
2. locality: diet facts edited one after another (wording 0, another diet), and after 1, 5 and 30 edits
   how many of the other 70 subjects' diet answers (wording 0) changed; then how many of the 30 edited
   subjects answer their target in each wording;
3. the router's question test: of the 30 edited subjects' keys and the 70 others' questions, how many
   pairs pass τ_q, and how many a per-edit question radius raised above the fit look-alikes would let in
   (as `EditRouter.lookalike_radius` raises the image threshold), and the edits' own rephrasings;
4. updates: 30 text facts edited (wording 0), then again to a newer value (wording 1); greedy answers on
   the three wordings: newest, stale or another.

    python scripts/text_edits.py SEED [key=value ...]     (e.g. route_subject=False)
"""
import argparse
import random
from collections import Counter

import torch
from measure import fitted

from unike.data.case import EditCase
from unike.metrics import Probe, generations, normalize
from unike.prompting import eos_id_of
from unike.training import targets, unrelated


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("seed", type=int)
    ap.add_argument("config", nargs="*", help="UniKEConfig fields as key=value (Python literals)")
    args = ap.parse_args()
    editor, world = fitted(args.config, args.seed)
    model, processor = editor.model, editor.processor

    def ask(prompts: list[str]) -> list[str]:
        return [normalize(a) for a in generations(model, processor, [Probe("x", None, q, "") for q in prompts])]

    with editor.disabled():
        for relation in world.text_questions:
            facts = [f for f in world.text_facts() if f[0] == relation]
            right = [sum(a == normalize(f[2]) for a, f in zip(ask([world.text_question(*f[:2], w) for f in facts]),
                                                               facts)) for w in range(3)]
            print(f"base {relation}: right {right} of {len(facts)} (wordings 0, 1, 2)")

    diet = [f for f in world.text_facts() if f[0] == "diet_by_name"]
    random.Random(args.seed).shuffle(diet)
    edited, others = diet[:30], diet[30:]
    values, rng = sorted({f[2] for f in diet}), random.Random(args.seed)
    question = lambda subject, w=0: world.text_question("diet_by_name", subject, w)   # noqa: E731
    with editor.disabled():
        base = ask([question(s) for _, s, _ in others])
    done, wanted = 0, []
    for k in (1, 5, 30):
        for _, subject, answer in edited[done:k]:
            wanted.append(rng.choice([v for v in values if v != answer]))
            editor.edit(EditCase(image=None, prompt=question(subject), target=wanted[-1]))
        done = k
        changed = sum(a != b for a, b in zip(ask([question(s) for _, s, _ in others]), base))
        print(f"locality: after {k} diet edits, {changed} of {len(others)} other subjects' answers changed")
    held = [sum(a == normalize(t) for a, t in zip(ask([question(s, w) for _, s, _ in edited]), wanted)) for w in range(3)]
    print(f"edited: after 30 diet edits, {held} of {len(edited)} answer their target (wordings 0 = edited, 1, 2)")
    editor.reset()

    router, cfg, first = editor.router, editor.config, editor.layer_ids[0]

    def states(subject: str, w: int):
        inputs = editor._inputs(EditCase(image=None, prompt=question(subject, w), target="moss"))
        return editor.collector.states(inputs), targets(inputs["labels"], eos_id_of(model, processor))

    keys = {}
    for _, s, _ in diet:
        for w in range(3):
            st, at = states(s, w)
            keys[s, w] = router.standardize(st[first].x[at][:1])[0]
    counts = Counter()
    text = ~router.negative_has
    for _, subject, _ in edited:
        st, at = states(subject, 0)
        apart = unrelated({l: x.q[at] for l, x in st.items()},
                          {l: editor.layers[l].negatives.to(x.q) for l, x in st.items()}, cfg.neg_exclude_cos)
        key, sims = keys[subject, 0], router.negatives @ keys[subject, 0]
        near = sims >= router.tau_question
        radius = router.tau_question
        if (near & apart & text).any():
            radius = float(sims[near & apart & text].max()) + 1e-3
        if (near & ~apart & text).any():
            radius = min(radius, float(sims[near & ~apart & text].min()))
        radius = max(radius, router.tau_question)
        for test, bar in (("tau_q", router.tau_question), ("radius", radius)):
            counts["own", test] += sum(float(keys[subject, w] @ key) >= bar for w in (1, 2))
            counts["other", test] += sum(float(keys[o, 0] @ key) >= bar for _, o, _ in others)
    print(f"question test: other subjects' questions passing τ_q {counts['other', 'tau_q']}, a look-alike radius "
          f"{counts['other', 'radius']}, of {len(edited) * len(others)}; own rephrasings {counts['own', 'tau_q']} / "
          f"{counts['own', 'radius']} of {2 * len(edited)}")

    facts, rng = world.text_facts(), random.Random(args.seed)
    rng.shuffle(facts)
    chosen, pools = facts[:30], {}
    for relation, _, answer in world.text_facts():
        pools.setdefault(relation, set()).add(answer)
    plan = [(relation, subject, *rng.sample(sorted(pools[relation] - {answer}), 2))
            for relation, subject, answer in chosen]
    for w, value in ((0, 2), (1, 3)):
        for step in plan:
            editor.edit(EditCase(image=None, prompt=world.text_question(step[0], step[1], w), target=step[value]))
    said, counts = ask([world.text_question(r, s, w) for r, s, _, _ in plan for w in range(3)]), Counter()
    for i, (_, _, stale, newest) in enumerate(plan):
        for w in range(3):
            got = said[3 * i + w]
            counts[w, "newest" if got == normalize(newest) else "stale" if got == normalize(stale) else "other"] += 1
    print("updates:", {w: {k: counts[w, k] for k in ("newest", "stale", "other")} for w in range(3)}, f"of {len(plan)}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
