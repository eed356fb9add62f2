"""Bad input gets a clear error that names the fix, raised before anything changes.

Every rejected call below is checked twice: the message names the fix, and the model (a fixed probe's
logits, its hooks and parameter names) and the editor (every state tensor, the counters) are bit-identical
to before the call. The editor under test is fitted and holds one edit, so nothing it holds is empty.
"""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import unike
from archs import ARCHS
from guard import FAST, assert_same, logits, snapshot, tiny_probe
from unike.persist import _sha256
from unike.prompting import encode


@pytest.fixture(scope="module")
def tiny():
    model, processor = unike.load_tiny()
    world = unike.SynthWorld(seed=0)
    editor = unike.UniKE(model, processor, unike.UniKEConfig(**FAST))
    editor.fit(world.triplets(n=32, seed=3), progress=False)
    case = world.edit_cases("vqa", n=1, seed=5)[0]
    editor.edit(case)
    yield model, processor, world, editor, case, tiny_probe(processor, world)
    editor.detach()


@pytest.fixture(scope="module")
def fresh():
    """A second tiny model with no editor: loads and constructions that must leave it untouched."""
    model, processor = unike.load_tiny()
    return model, processor, tiny_probe(processor, unike.SynthWorld(seed=0))


def _encoded(processor, case, **change):
    inputs = encode(processor, case.image, case.prompt, case.target)
    for key, fn in change.items():
        inputs[key] = fn(inputs[key])
    return inputs


def _drop(key):
    return lambda p, c: {k: v for k, v in _encoded(p, c).items() if k != key}


def _labels_all_ignored(p, c):
    return _encoded(p, c, labels=lambda t: torch.full_like(t, -100))


def _labels_at_start(p, c):
    return _encoded(p, c, labels=lambda t: torch.cat([t[:, -1:], t[:, 1:]], 1))


# (id, make the bad item from (processor, case), exception, words the message must contain)
BAD_EDITS = [
    ("untokenizable-target", lambda p, c: unike.EditCase(c.image, c.prompt, "qwertyuiop"), ValueError,
     "tokenizer does not know"),
    ("target-of-nothing", lambda p, c: unike.EditCase(c.image, c.prompt, "\u200b"), ValueError,
     "tokenizes to nothing|tokenizer does not know"),
    ("prompt-over-context", lambda p, c: unike.EditCase(c.image, " ".join([c.prompt] * 40), c.target), ValueError,
     "context of 128; shorten"),
    ("a-string", lambda p, c: c.prompt, TypeError, "EditCase or an inputs dict"),
    ("dict-without-labels", _drop("labels"), ValueError, "must hold `input_ids` and `labels`"),
    ("labels-all-ignored", _labels_all_ignored, ValueError, "no target token"),
    ("labels-on-first-token", _labels_at_start, ValueError, "prompt must come before the answer"),
    ("labels-wrong-shape", lambda p, c: _encoded(p, c, labels=lambda t: t[:, 1:]), ValueError,
     "must have the shape of input_ids"),
    ("input-ids-float", lambda p, c: _encoded(p, c, input_ids=lambda t: t.float()), TypeError,
     "integer token ids"),
    ("labels-float", lambda p, c: _encoded(p, c, labels=lambda t: t.float()), TypeError, "integer token ids"),
    ("ids-of-another-vocabulary", lambda p, c: _encoded(p, c, input_ids=lambda t: t + 1000), ValueError,
     "another model's processor"),
    ("pixels-on-meta-device", lambda p, c: _encoded(p, c, pixel_values=lambda t: t.to("meta")), ValueError,
     "meta device"),
    ("image-file-missing", lambda p, c: unike.EditCase("no/such/image.png", c.prompt, c.target), FileNotFoundError,
     "does not exist"),
    ("image-as-array", lambda p, c: unike.EditCase(np.zeros((64, 64, 3), np.uint8), c.prompt, c.target), TypeError,
     "PIL.Image.fromarray"),
]


@pytest.mark.parametrize("make, error, words", [b[1:] for b in BAD_EDITS], ids=[b[0] for b in BAD_EDITS])
def test_bad_edit_is_refused_and_changes_nothing(tiny, make, error, words):
    model, processor, _, editor, case, probe = tiny
    before = snapshot(model, probe, editor)
    with pytest.raises(error, match=words):
        editor.edit(make(processor, case))
    assert_same(before, snapshot(model, probe, editor))


# (id, constructor call, exception, words)
BAD_RECORDS = [
    ("empty-target", lambda: unike.EditCase(image=None, prompt="what ?", target=" "), ValueError, "target is empty"),
    ("empty-prompt", lambda: unike.EditCase(image=None, prompt="", target="x"), ValueError, "prompt is empty"),
    ("m-gen-without-image", lambda: unike.EditCase(None, "what ?", "x", rephrase_image="a.png"), ValueError,
     "rephrase_image needs the edit's image"),
    ("caption-without-image", lambda: unike.EditCase(None, "describe", "x", task="caption"), ValueError,
     "task='caption' needs the edit's image"),
    ("probe-without-answer", lambda: unike.EditCase(None, "what ?", "x", loc_prompt="who ?"), ValueError,
     "loc_prompt is given without loc_answer"),
    ("triplet-same-answers", lambda: unike.Triplet(None, "what ?", "red", "red "), ValueError, "must differ"),
    ("triplet-empty-wrong", lambda: unike.Triplet(None, "what ?", "red", ""), ValueError, "wrong is empty"),
    ("config-layers-str", lambda: unike.UniKEConfig(layers="4"), TypeError, "layers = '4' \\(str\\) must be"),
    ("config-top-k-zero", lambda: unike.UniKEConfig(top_k=0), ValueError, "top_k=0 must be at least 1"),
    ("config-zeta-unknown", lambda: unike.UniKEConfig(zeta="both"), ValueError, "zeta must be one of"),
]


@pytest.mark.parametrize("make, error, words", [b[1:] for b in BAD_RECORDS], ids=[b[0] for b in BAD_RECORDS])
def test_bad_record_or_config_is_refused(make, error, words):
    with pytest.raises(error, match=words):
        make()


@pytest.mark.parametrize("layers", [0, [0, 6], [], [-7]])
def test_layers_out_of_range(fresh, layers):
    model, processor, probe = fresh
    before = snapshot(model, probe)
    with pytest.raises(ValueError, match="out of range for a decoder of 6 layers; pass a count in 1..6"):
        unike.UniKE(model, processor, unike.UniKEConfig(layers=layers))
    assert_same(before, snapshot(model, probe))


def test_more_layers_than_the_decoder_has_edits_all_with_a_warning(fresh):
    model, processor, _ = fresh
    with pytest.warns(UserWarning, match="layers=7 but the decoder has 6 layers: editing all 6"):
        editor = unike.UniKE(model, processor, unike.UniKEConfig(layers=7))
    assert editor.layer_ids == list(range(6)) and editor.config.layers == 6
    editor.detach()


def test_second_editor_on_the_same_layers_is_refused(tiny):
    model, processor, _, editor, _, probe = tiny
    before = snapshot(model, probe, editor)
    with pytest.raises(RuntimeError, match="detach it first"):
        unike.UniKE(model, processor)
    assert_same(before, snapshot(model, probe, editor))


def test_unknown_architecture_lists_candidates_and_the_override():
    class NoDecoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vision = torch.nn.ModuleList([torch.nn.Linear(2, 2)])
            self.blocks_of_text = torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(3)])

    model = NoDecoder()
    keys = list(model.state_dict())
    with pytest.raises(unike.LocateError) as err:
        unike.UniKE(model)
    text = str(err.value)
    assert "vision: 1" in text and "blocks_of_text: 3" in text     # the candidates
    assert 'layers="blocks_of_text"' in text and "UniKEConfig(layers_path=...)" in text   # the override
    assert list(model.state_dict()) == keys and not any(m._forward_hooks for m in model.modules())


def _fit_triplets(world, n=32, **last):
    triplets = world.triplets(n=n, seed=3)
    if last:
        t = triplets[-1]
        triplets[-1] = unike.Triplet(**{**vars(t), **last})
    return triplets


BAD_FITS = [
    ("too-few-triplets", lambda w: _fit_triplets(w, n=4), ValueError, "got 4 triplets; it needs at least 8"),
    ("no-triplets", lambda w: [], ValueError, "got 0 triplets"),
    ("untokenizable-answer", lambda w: _fit_triplets(w, wrong="zzzzqx"), ValueError,
     "triplet 31: the answer 'zzzzqx' holds words"),
    ("image-file-missing", lambda w: _fit_triplets(w, image="no/such.png"), FileNotFoundError,
     "do not exist, e.g. \\['no/such.png'\\]"),
    ("not-triplets", lambda w: [("img", "q", "a", "b")] * 32, TypeError, "takes unike.Triplet records"),
]


@pytest.mark.parametrize("make, error, words", [b[1:] for b in BAD_FITS], ids=[b[0] for b in BAD_FITS])
def test_bad_fit_is_refused_and_changes_nothing(tiny, make, error, words):
    model, _, world, editor, _, probe = tiny
    before = snapshot(model, probe, editor)
    with pytest.raises(error, match=words):
        editor.fit(make(world), progress=False)
    assert_same(before, snapshot(model, probe, editor))


# ------------------------------------------------------------------------------------- save / load
@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory):
    return tiny[3].save(tmp_path_factory.mktemp("saved") / "state")


def _tamper_json(saved, tmp_path, **change):
    meta = json.loads((saved / "unike.json").read_text())
    for key, value in change.items():
        if key == "config":
            meta["config"].update(value)
        else:
            meta[key] = value
    folder = tmp_path / "tampered"
    folder.mkdir(exist_ok=True)
    (folder / "unike.safetensors").write_bytes((saved / "unike.safetensors").read_bytes())
    (folder / "unike.json").write_text(json.dumps(meta))
    return folder


def _tamper_tensors(saved, tmp_path, fn):
    """A state whose tensors `fn` altered, with a checksum that matches (a careful forger)."""
    state = fn(load_file(str(saved / "unike.safetensors")))
    folder = _tamper_json(saved, tmp_path)
    save_file(state, str(folder / "unike.safetensors"))
    meta = json.loads((folder / "unike.json").read_text())
    meta["sha256"] = _sha256(folder / "unike.safetensors")
    (folder / "unike.json").write_text(json.dumps(meta))
    return folder


def _truncated(saved, tmp_path):
    folder = _tamper_json(saved, tmp_path)
    data = (saved / "unike.safetensors").read_bytes()
    (folder / "unike.safetensors").write_bytes(data[: len(data) // 2])
    return folder


def _garbage_json(saved, tmp_path):
    folder = _tamper_json(saved, tmp_path)
    (folder / "unike.json").write_text('{"config": {')
    return folder


def _mixed_saves(saved, tmp_path):
    folder = _tamper_json(saved, tmp_path)
    state = load_file(str(saved / "unike.safetensors"))
    save_file({k: v + 1 if v.is_floating_point() else v for k, v in state.items()}, str(folder / "unike.safetensors"))
    return folder


def _wider(state):
    return {k: torch.cat([v, v[:, :1]], 1) if k.endswith(".memory.keys") else v
            for k, v in state.items()}


def _without_edited(state):
    return {k: v for k, v in state.items() if not k.endswith(".edited")}


def _one_row_short(state):
    return {k: v[:-1] if k.endswith(".memory.values") else v for k, v in state.items()}


BAD_LOADS = [
    ("missing-folder", lambda s, t: t / "nowhere", FileNotFoundError, "not a folder; pass the folder written by"),
    ("a-file", lambda s, t: s / "unike.json", FileNotFoundError, "not a folder"),
    ("missing-json", lambda s, t: (_tamper_json(s, t) / "unike.json").unlink() or t / "tampered", FileNotFoundError,
     "unike.json is missing"),
    ("truncated-tensors", _truncated, ValueError, "corrupt or truncated"),
    ("garbage-json", _garbage_json, ValueError, "corrupt or truncated"),
    ("files-of-two-saves", _mixed_saves, ValueError, "does not match the checksum"),
    ("json-field-mistyped", lambda s, t: _tamper_json(s, t, n_edits="one"), ValueError,
     "mistyped fields: n_edits \\(needs int\\)"),
    ("json-field-missing", lambda s, t: _tamper_json(s, t, sha256=None), ValueError, "sha256 \\(needs str\\)"),
    ("json-unknown-config-field", lambda s, t: _tamper_json(s, t, config={"run_shell": "rm -rf /"}), ValueError,
     "config fields UniKEConfig does not have: \\['run_shell'\\]"),
    ("json-config-mistyped", lambda s, t: _tamper_json(s, t, config={"top_k": "40"}), ValueError,
     "top_k = '40' \\(str\\) must be int"),
    ("json-layers-changed", lambda s, t: _tamper_json(s, t, layer_ids=[0, 1, 2, 3]), ValueError,
     "lists layers \\[0, 1, 2, 3\\], but its config gives \\[2, 3, 4, 5\\]"),
    ("json-edits-miscounted", lambda s, t: _tamper_json(s, t, n_edits=3), ValueError, "inconsistent"),
    ("tensor-wrong-width", lambda s, t: _tamper_tensors(s, t, _wider), ValueError,
     "layers.2.memory.keys is torch.float32 \\(\\d+, 129\\); this editor needs torch.float32 \\('any', 128\\)"),
    ("tensor-missing", lambda s, t: _tamper_tensors(s, t, _without_edited), ValueError, "lacks \\['layers.2.edited'"),
    ("tensor-rows-inconsistent", lambda s, t: _tamper_tensors(s, t, _one_row_short), ValueError,
     "layer 2 is inconsistent"),
]


@pytest.mark.parametrize("make, error, words", [b[1:] for b in BAD_LOADS], ids=[b[0] for b in BAD_LOADS])
def test_bad_state_is_refused_and_changes_nothing(fresh, saved, tmp_path, make, error, words):
    model, processor, probe = fresh
    before = snapshot(model, probe)
    with pytest.raises(error, match=words):
        unike.UniKE.load(model, processor, make(saved, tmp_path))
    assert_same(before, snapshot(model, probe))


def test_state_from_a_model_of_another_width_or_depth(saved):
    other = ARCHS["llava"]().model      # width 32
    with pytest.raises(ValueError, match="for a model with 6 layers of width 128; this model has 2 of width 32"):
        unike.UniKE.load(other, None, saved)
    from transformers import AutoConfig, AutoModelForImageTextToText
    config = AutoConfig.from_pretrained(unike.tiny.WEIGHTS)
    config.text_config.num_hidden_layers = 5
    deeper = AutoModelForImageTextToText.from_config(config)
    with pytest.raises(ValueError, match="6 layers of width 128; this model has 5 of width 128"):
        unike.UniKE.load(deeper, None, saved)
    assert not any("unike_" in k for k in list(other.state_dict()) + list(deeper.state_dict()))


def test_load_onto_a_model_with_an_editor_keeps_that_editor(tiny, saved):
    model, processor, _, editor, _, probe = tiny
    before = snapshot(model, probe, editor)
    with pytest.raises(RuntimeError, match="detach it first"):
        unike.UniKE.load(model, processor, saved)
    assert_same(before, snapshot(model, probe, editor))


def test_save_to_a_file_path_is_refused(tiny, tmp_path):
    model, _, _, editor, _, probe = tiny
    target = tmp_path / "state.bin"
    target.write_bytes(b"mine")
    before = snapshot(model, probe, editor)
    with pytest.raises(FileExistsError, match="is a file; save\\(\\) writes a folder"):
        editor.save(target)
    assert target.read_bytes() == b"mine"
    assert_same(before, snapshot(model, probe, editor))


def test_no_pickle_anywhere():
    """State files load through safetensors and JSON only: no torch.load / pickle in the package."""
    from pathlib import Path
    source = Path(unike.__file__).parent
    offenders = [f"{p.relative_to(source)}: {word}" for p in source.rglob("*.py") for word in
                 ("torch.load", "import pickle", "from pickle", "cloudpickle", "weights_only", "dill")
                 if word in p.read_text()]
    assert not offenders, offenders


def test_evaluate_with_a_missing_probe_image_changes_nothing(tiny):
    model, _, world, editor, case, probe = tiny
    cases = world.edit_cases("vqa", n=2, seed=8)
    cases[1].rephrase_image = "no/such/rendering.png"
    before = snapshot(model, probe, editor)
    with pytest.raises(FileNotFoundError, match="1 probe image\\(s\\) do not exist, e.g. \\['no/such/rendering"):
        unike.evaluate(editor, cases, progress=False)
    assert_same(before, snapshot(model, probe, editor))


BAD_MMEDIT = [
    ("empty-image", dict(image=""), "1 with an empty image"),
    ("parent-path", dict(image="../outside.png"), "1 with an image path outside its image folder"),
    ("absolute-path", dict(image_rephrase="/etc/hostname"), "1 with an image_rephrase path outside its image"),
]


@pytest.mark.parametrize("change, words", [b[1:] for b in BAD_MMEDIT], ids=[b[0] for b in BAD_MMEDIT])
def test_bad_mmedit_record(tmp_path, change, words):
    """A bad record is skipped with a warning that says why; a file of bad records raises."""
    path = unike.SynthWorld(seed=0).export_mmedit(tmp_path, task="vqa", n=2, seed=0)
    records = json.loads(path.read_text())
    records[0].update(change)
    path.write_text(json.dumps(records))
    with pytest.warns(UserWarning, match=f"skipped 1 of 2 records: {words}"):
        assert [c.meta["record"] for c in unike.load_mmedit(path, tmp_path)] == [1]
    path.write_text(json.dumps(records[:1]))
    with pytest.raises(ValueError, match=f"no usable record among 1 \\({words}"):
        unike.load_mmedit(path, tmp_path)


@pytest.mark.parametrize("dropped", [(".residual",), (".basis", ".coords", ".residual")],
                         ids=["no-residual", "no-index"])
def test_state_saved_before_the_index_loads_with_it_rebuilt(tiny, fresh, saved, tmp_path, dropped):
    """An editor saved before the memory's index had residuals, or before it had an index at all, loads:
    the index is rebuilt from the saved keys, the same as the one saved with it, and the model answers as
    the saved editor."""
    editor, probe = tiny[3], tiny[5]
    model, processor, _ = fresh
    older = lambda state: {k: v for k, v in state.items() if not k.endswith(dropped)}  # noqa: E731
    with pytest.warns(UserWarning, match="before the latent memory had its index .*; rebuilding it"):
        loaded = unike.UniKE.load(model, processor, _tamper_tensors(saved, tmp_path, older))
    try:
        for k, v in editor.state().items():
            assert torch.equal(loaded.state()[k], v), k
        assert torch.equal(logits(model, probe), logits(editor.model, probe))
    finally:
        loaded.detach()


def _per_kind_names(state):
    """The names states had before the editor's tensors were one module's (`spaces.2.x`, `memory.2.x`,
    `negatives.2`, ...)."""
    def old(name):
        parts = name.split(".")
        if parts[0] != "layers":
            return name
        l, kind, rest = parts[1], parts[2], [p for p in parts[3:] if p != "index"]
        return f"{kind}.{l}" if not rest else ".".join([kind, l, *rest])
    return {old(k): v for k, v in state.items()}


def test_state_saved_with_per_kind_names_loads_the_same(tiny, fresh, saved, tmp_path):
    editor, probe = tiny[3], tiny[5]
    model, processor, _ = fresh
    loaded = unike.UniKE.load(model, processor, _tamper_tensors(saved, tmp_path, _per_kind_names))
    try:
        assert loaded.state().keys() == editor.state().keys()
        for k, v in editor.state().items():
            assert torch.equal(loaded.state()[k], v), k
        assert torch.equal(logits(model, probe), logits(editor.model, probe))
    finally:
        loaded.detach()
