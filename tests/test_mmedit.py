"""`load_mmedit` on real-world files: incomplete records are skipped with one counting warning, never the
whole file; images resolve against image_root / rephrase_root as EasyEdit's coco_image / rephrase_image."""
import json
import shutil
import warnings

import pytest

import unike


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("mmedit")
    return root, unike.SynthWorld(seed=0).export_mmedit(root, task="vqa", n=8, seed=2)


def rewrite(path, tmp_path, change) -> object:
    records = json.loads(path.read_text())
    for i, fields in change.items():
        records[i].update(fields)
    out = tmp_path / "vqa_eval.json"
    out.write_text(json.dumps(records))
    return out


def test_incomplete_records_are_skipped_with_one_warning_that_counts_them(exported, tmp_path):
    root, path = exported
    bad = rewrite(path, tmp_path, {1: {"loc_ans": ""}, 3: {"m_loc_a": ""}, 4: {"alt": " "}, 6: {"loc_ans": ""}})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cases = unike.load_mmedit(bad, root)
    assert [c.meta["record"] for c in cases] == [0, 2, 5, 7]
    assert len(caught) == 1
    text = str(caught[0].message)
    assert "skipped 4 of 8 records" in text
    assert "2 with loc without loc_ans" in text and "1 with m_loc without m_loc_a" in text
    assert "1 with an empty alt" in text


def test_a_missing_image_skips_its_record_and_a_wrong_root_raises(exported, tmp_path):
    root, path = exported
    shutil.copytree(root / "images", tmp_path / "images")
    moved = tmp_path / "vqa_eval.json"
    moved.write_text(path.read_text())
    record = json.loads(path.read_text())[5]
    (tmp_path / record["m_loc"]).unlink()
    with pytest.warns(UserWarning, match="skipped 1 of 8 records: 1 with a missing image.*coco_image"):
        assert len(unike.load_mmedit(moved)) == 7           # default image_root: the JSON's folder
    with pytest.raises(FileNotFoundError, match="no usable record among 8 \\(8 with a missing image\\)"):
        unike.load_mmedit(moved, tmp_path / "images")


def test_rephrase_root_resolves_image_rephrase_only(exported, tmp_path):
    root, path = exported
    elsewhere = tmp_path / "rephrase"
    for rec in json.loads(path.read_text()):
        target = elsewhere / rec["image_rephrase"]
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(root / rec["image_rephrase"], target)
    cases = unike.load_mmedit(path, root, rephrase_root=elsewhere)
    assert all(c.rephrase_image.startswith(str(elsewhere)) and c.image.startswith(str(root)) for c in cases)
    assert len(cases) == 8


def test_probes_of_loaded_cases_match_the_fields(exported):
    root, path = exported
    case = unike.load_mmedit(path, root)[0]
    metrics = [p.metric for p in unike.metrics.probes(case)]
    assert {"rel", "t_gen", "m_gen", "t_loc", "m_loc", "ci_loc", "ri_loc"} <= set(metrics)
