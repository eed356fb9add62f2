"""unike.tutorial: the notebooks' set-up, probes and inputs, on the shipped tiny model."""
import pytest
import torch

import unike
from unike import tutorial
from unike.metrics import probes as metric_probes
from unike.prompting import answer_tokens


@pytest.fixture(scope="module")
def run():
    return tutorial.setup(n_triplets=6, n_eval=2, n_held_out=3)


def test_setup_draws_synthworld_data_for_the_tiny_model(run):
    assert type(run.model).__name__ == "LlavaForConditionalGeneration" and not run.model.training
    assert isinstance(run.world, unike.SynthWorld)
    assert len(run.triplets) == 6 and len(run.held_out) == 3 and all(isinstance(t, unike.Triplet) for t in run.triplets)
    assert sorted(run.cases) == ["caption", "vqa"] and all(len(c) == 2 for c in run.cases.values())
    assert {t.question for t in run.triplets} == {t.question for t in run.world.triplets(n=6, seed=3)}
    assert [c.prompt for c in run.cases["vqa"]] == [c.prompt for c in run.world.edit_cases("vqa", n=2, seed=11)]
    assert "6 fit triplets, 2 vqa cases, 2 caption cases, 3 held-out triplets" in str(run)


def test_setup_reads_mmedit_files(run, tmp_path):
    train = run.world.export_mmedit(tmp_path, "vqa", n=5, seed=1).rename(tmp_path / "vqa_train.json")
    vqa = run.world.export_mmedit(tmp_path, "vqa", n=3, seed=2)
    data = dict(train=str(train), vqa=str(vqa), images=str(tmp_path))
    loaded = tutorial.setup(data=data, n_triplets=3, n_eval=2, n_held_out=4)
    assert loaded.world is None and list(loaded.cases) == ["vqa"] and len(loaded.cases["vqa"]) == 2
    assert len(loaded.triplets) == 3 and len(loaded.held_out) == 2       # 5 train records: 3 fit, 2 left
    first = unike.load_mmedit(train, tmp_path)[0]
    assert loaded.triplets[0] == unike.Triplet(first.image, first.prompt, first.target, first.ground_truth)


def test_probes_name_what_evaluate_scores(run):
    case = run.cases["vqa"][0]
    named = tutorial.probes(case)
    scored = metric_probes(case)
    assert len(named) == len(scored) and list(named)[0] == "the edit"
    by_metric = {p.metric: (p.image, p.prompt) for p in scored}
    assert all(named[tutorial.PROBE_NAMES[m]] == probe for m, probe in by_metric.items())
    assert named["unrelated text question"] == (None, case.loc_prompt)


def test_inputs_and_first_token_match_answer(run):
    model, processor = run.model, run.processor
    case = run.cases["vqa"][0]
    inputs = tutorial.inputs(model, processor, case.image, case.prompt)
    assert inputs["input_ids"].shape[0] == 1 and inputs["pixel_values"].dtype == next(model.parameters()).dtype
    with torch.no_grad():
        top = model(**inputs).logits[0, -1].argmax().item()
    greedy = unike.answer(model, processor, case.image, case.prompt)
    assert top == tutorial.first_token(processor, greedy) == answer_tokens(processor, greedy)[0]
    labelled = tutorial.inputs(model, processor, None, case.loc_prompt, case.loc_answer)
    assert "pixel_values" not in labelled and (labelled["labels"] != -100).sum() == len(
        answer_tokens(processor, case.loc_answer))
