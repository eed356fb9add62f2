"""fp32, bf16 and fp16 models on CPU; a model cast after attaching; inputs of another dtype; a model split
by accelerate's `device_map` across CPU and disk offload (the path for models that outgrow one GPU)."""
import pytest
import torch
from transformers import AutoModelForImageTextToText

import unike
from guard import hooks_of, logits, tiny_probe
from unike.prompting import encode

FIT = dict(encoder_steps=10, min_triplets=8)
pytestmark = pytest.mark.slow          # each test fits and edits the tiny model, some twice


@pytest.fixture(scope="module")
def world():
    return unike.SynthWorld(seed=0)


def _fit_and_edit(model, processor, world, case, **over):
    editor = unike.UniKE(model, processor, unike.UniKEConfig(**{**FIT, **over}))
    editor.fit(world.triplets(n=32, seed=3), progress=False)
    editor.edit(case)
    return editor


def _fp32_buffers(editor) -> bool:
    return all(t.dtype == torch.float32 for l in editor.layer_ids
               for t in (editor.memory[l].keys, editor.memory[l].attn_values, editor.neurons[l].keys,
                         editor.neurons[l].values, editor.spaces[l].sem.net[0].weight))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_fit_edit_evaluate_detach(world, dtype):
    model, processor = unike.load_tiny(dtype=dtype)
    probe = tiny_probe(processor, world)
    base = logits(model, probe)
    case = world.edit_cases("vqa", n=1, seed=5)[0]
    editor = _fit_and_edit(model, processor, world, case)
    assert unike.answer(model, processor, case.image, case.prompt) == case.target
    assert logits(model, probe).dtype == dtype                       # the model's dtype comes out
    assert _fp32_buffers(editor)                                     # unike's own state stays fp32
    scores = unike.evaluate(editor, world.edit_cases("vqa", n=1, seed=11), progress=False)
    assert scores["rel"] == 100.0, scores
    editor.detach()
    assert torch.equal(logits(model, probe), base)


def test_model_cast_after_attaching(world):
    model, processor = unike.load_tiny()
    probe = tiny_probe(processor, world)
    cases = world.edit_cases("vqa", n=2, seed=5)
    editor = _fit_and_edit(model, processor, world, cases[0])
    model.to(torch.bfloat16)                        # casts unike's submodules too ...
    assert unike.answer(model, processor, cases[0].image, cases[0].prompt) == cases[0].target
    assert _fp32_buffers(editor)                    # ... and the first forward puts them back in fp32
    editor.edit(cases[1])
    assert unike.answer(model, processor, cases[1].image, cases[1].prompt) == cases[1].target
    editor.detach()
    plain, _ = unike.load_tiny()
    assert torch.equal(logits(model, probe), logits(plain.to(torch.bfloat16), probe))


def test_inputs_of_another_dtype_are_cast_to_the_model(world):
    """pixel_values in float64 or bf16 give the very edit float32 pixels give (on_model casts them)."""
    model, processor = unike.load_tiny()
    probe = tiny_probe(processor, world)
    case = world.edit_cases("vqa", n=1, seed=5)[0]
    results = []
    for pixel_dtype in (torch.float32, torch.float64):
        inputs = encode(processor, case.image, case.prompt, case.target)
        inputs["pixel_values"] = inputs["pixel_values"].to(pixel_dtype)
        inputs["attention_mask"] = inputs["attention_mask"].bool()
        editor = unike.UniKE(model, processor, unike.UniKEConfig(**FIT, edit_steps=10))
        with pytest.warns(UserWarning, match="external memory is empty"):
            editor.edit(inputs)
        results.append(logits(model, probe))
        editor.detach()
    assert torch.equal(*results)


def _offloaded(folder):
    """The tiny model with its first three text layers on CPU and the last three offloaded to disk."""
    device_map = {name: "cpu" for name in ("model.vision_tower", "model.multi_modal_projector", "lm_head",
                                           "model.language_model.embed_tokens", "model.language_model.norm",
                                           "model.language_model.rotary_emb")}
    device_map.update({f"model.language_model.layers.{i}": "cpu" if i < 3 else "disk" for i in range(6)})
    return AutoModelForImageTextToText.from_pretrained(unike.tiny.WEIGHTS, device_map=device_map,
                                                       offload_folder=folder).eval()


def test_device_map_with_disk_offload(world, tmp_path):
    plain, processor = unike.load_tiny()
    probe = tiny_probe(processor, world)
    cases = world.edit_cases("vqa", n=2, seed=5)
    editor = _fit_and_edit(plain, processor, world, cases[0])
    edited = logits(plain, probe)
    folder = editor.save(tmp_path / "state")
    editor.detach()

    model = _offloaded(tmp_path / "offload")
    last = model.model.language_model.layers[5]
    assert next(last.parameters()).device.type == "meta"             # weights wait on disk between calls
    base, hooks, keys = logits(model, probe), hooks_of(model), list(model.state_dict())
    assert torch.allclose(base, logits(plain, probe), atol=1e-5)

    editor = unike.UniKE.load(model, processor, folder)              # an edit made elsewhere ...
    assert next(last.unike_memory.buffers()).device.type == "cpu"    # ... on the execution device, not meta
    assert torch.allclose(logits(model, probe), edited, atol=1e-5)
    assert unike.answer(model, processor, cases[0].image, cases[0].prompt) == cases[0].target
    editor.edit(cases[1])                                            # training through offloaded layers
    assert unike.answer(model, processor, cases[1].image, cases[1].prompt) == cases[1].target
    assert next(last.parameters()).device.type == "meta"             # offloading still works
    editor.detach()
    assert torch.equal(logits(model, probe), base)
    assert hooks_of(model) == hooks and list(model.state_dict()) == keys
