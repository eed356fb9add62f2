"""Text-only edits on an editor fit on image triplets only (no fit prompt like the edits'): the figures of
"Text-only edits: the subject test" in docs/method.md. Five capital and five diet edits (wording 0), one
relation at a time: each edit's subject, how many of the edited facts' three wordings answer the target,
and how many of the other subjects' answers (three wordings each) change.

    python scripts/text_edits_image_fit.py [key=value ...]     (e.g. route_subject=False)
"""
import ast
import random
import sys

import torch

import unike
from unike.data.case import EditCase
from unike.metrics import Probe, generations, normalize


def main() -> None:
    config = {k: ast.literal_eval(v) for k, v in (a.split("=", 1) for a in sys.argv[1:])}
    model, processor = unike.load_tiny()
    world = unike.SynthWorld(seed=0)
    editor = unike.UniKE(model, processor, unike.UniKEConfig(seed=0, **config))
    editor.fit([t for t in world.triplets(n=2000, seed=3) if t.image is not None], progress=False)
    tok = processor.tokenizer

    def ask(prompts: list[str]) -> list[str]:
        return [normalize(a) for a in generations(model, processor, [Probe("x", None, q, "") for q in prompts])]

    for relation in ("capital", "diet_by_name"):
        facts = [f for f in world.text_facts() if f[0] == relation]
        random.Random(0).shuffle(facts)
        edited, others = facts[:5], facts[5:]
        values = sorted({f[2] for f in facts})
        other_prompts = [world.text_question(relation, s, w) for _, s, _ in others for w in range(3)]
        with editor.disabled():
            base = ask(other_prompts)
        wanted = []
        for _, subject, answer in edited:
            wanted.append(random.Random(subject).choice([v for v in values if v != answer]))
            editor.edit(EditCase(image=None, prompt=world.text_question(relation, subject, 0), target=wanted[-1]))
            words = [tok.convert_ids_to_tokens(i) for i in editor.router.subject[-1].tolist() if i >= 0]
            print(f"{relation} {subject}: subject {words}")
        got = ask([world.text_question(relation, s, w) for _, s, _ in edited for w in range(3)])
        right = sum(g == normalize(wanted[i // 3]) for i, g in enumerate(got))
        changed = sum(a != b for a, b in zip(ask(other_prompts), base))
        print(f"{relation}: edited right {right} of {len(got)}; others changed {changed} of {len(base)}")
        editor.reset()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
