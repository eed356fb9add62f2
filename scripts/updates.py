"""Updates: N facts edited, then each edited again to a newer value (another rendering and wording of the
same question), the figures quoted in docs/method.md ("Updates"). Every fact of `SynthWorld(seed=0)`
appears twice in its VQA list without sequence safety; the first N facts of `edit_cases("vqa", n=1000,
seed=SEED)` are edited in that list's order of first appearance, then their second appearances. Scored
by greedy generation (`unike.metrics.generations`) on both edits' question, rephrased question and other
image: the newest value, the first edit's (stale) or another answer.

    python scripts/updates.py N SEED [key=value ...]     (e.g. route_updates=False)
"""
import argparse
from collections import Counter

from measure import fitted
from tqdm import tqdm

from unike.metrics import Probe, generations, normalize


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("n", type=int)
    ap.add_argument("seed", type=int)
    ap.add_argument("config", nargs="*", help="UniKEConfig fields as key=value (Python literals)")
    args = ap.parse_args()
    editor, world = fitted(args.config, args.seed)
    cases, first, second = world.edit_cases("vqa", n=1000, seed=args.seed), {}, {}
    for case in cases:
        fact = (case.meta["entity"], case.meta["fact"])
        (second if fact in first else first).setdefault(fact, case)
    facts = [f for f in first if f in second][:args.n]
    for case in tqdm([first[f] for f in facts] + [second[f] for f in facts], desc="edits"):
        editor.edit(case)
    probes = [(Probe(m, image, prompt, second[f].target), first[f].target) for f in facts for c in (first[f], second[f])
              for m, image, prompt in (("rel", c.image, c.prompt), ("t_gen", c.image, c.rephrase_prompt),
                                       ("m_gen", c.rephrase_image, c.prompt))]
    said = generations(editor.model, editor.processor, [p for p, _ in probes])
    counts = Counter()
    for (probe, stale), answer in zip(probes, said):
        kind = {normalize(probe.answer): "newest", normalize(stale): "stale"}.get(normalize(answer), "other")
        counts[probe.metric, kind] += 1
    for metric in ("rel", "t_gen", "m_gen"):
        print(metric, {k: counts[metric, k] for k in ("newest", "stale", "other")}, f"of {2 * len(facts)}")


if __name__ == "__main__":
    main()
