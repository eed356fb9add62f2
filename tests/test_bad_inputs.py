"""Bad input gets a clear error that names the fix, raised before anything changes."""
import pytest
import torch

import unike
from archs import ARCHS


@pytest.fixture(scope="module")
def tiny():
    model, processor = unike.load_tiny()
    return model, processor, unike.SynthWorld(seed=0).edit_cases("vqa", n=1, seed=5)[0]


def _logits(model, processor, case):
    from unike.prompting import encode
    with torch.no_grad():
        return model(**encode(processor, case.image, case.prompt)).logits


def test_untokenizable_target_and_overlong_prompt(tiny):
    model, processor, case = tiny
    before = _logits(model, processor, case)
    editor = unike.UniKE(model, processor)
    bad = unike.EditCase(image=case.image, prompt=case.prompt, target="qwertyuiop")
    with pytest.raises(ValueError, match="tokenizer does not know"):
        editor.edit(bad)
    long = unike.EditCase(image=case.image, prompt=" ".join([case.prompt] * 40), target=case.target)
    with pytest.raises(ValueError, match="context"):
        editor.edit(long)
    with pytest.raises(TypeError, match="EditCase or an inputs dict"):
        editor.edit("what is it ?")
    assert editor.n_edits == 0
    assert torch.equal(_logits(model, processor, case), before)
    editor.detach()


def test_empty_prompt_or_target():
    with pytest.raises(ValueError, match="target is empty"):
        unike.EditCase(image=None, prompt="what ?", target=" ")
    with pytest.raises(ValueError, match="prompt is empty"):
        unike.EditCase(image=None, prompt="", target="x")


def test_second_editor_on_the_same_layers_is_refused(tiny):
    model, processor, _ = tiny
    first = unike.UniKE(model, processor)
    with pytest.raises(RuntimeError, match="detach it first"):
        unike.UniKE(model, processor)
    first.detach()
    unike.UniKE(model, processor).detach()


def test_state_from_another_model_or_corrupt_file(tiny, tmp_path):
    model, processor, case = tiny
    editor = unike.UniKE(model, processor)
    editor.save(tmp_path / "state")
    editor.detach()
    other = ARCHS["llava"]().model
    with pytest.raises(ValueError, match="layers of width"):
        unike.UniKE.load(other, None, tmp_path / "state")
    (tmp_path / "state" / "unike.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="corrupt or truncated"):
        unike.UniKE.load(model, processor, tmp_path / "state")
    with pytest.raises(FileNotFoundError, match="editor.save"):
        unike.UniKE.load(model, processor, tmp_path / "missing")
    assert not any("unike_" in k for k in model.state_dict())


def test_unknown_architecture_lists_candidates():
    class NoLayers(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vision = torch.nn.ModuleList([torch.nn.Linear(2, 2)])

    with pytest.raises(unike.LocateError, match="layers="):
        unike.UniKE(NoLayers())
