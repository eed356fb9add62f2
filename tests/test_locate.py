"""Unit tests of `unike.locate`: override paths, errors, plain language models, fake module trees."""

from __future__ import annotations

import types
import warnings

import pytest
import torch
import transformers as tf
from torch import nn

from archs import ARCHS  # tests/ is on sys.path (tests/conftest.py)
from unike.locate import Layer, LocateError, TextStack, locate

# ---------------------------------------------------------------------------------------------
# Fake module trees (no transformers): a config-like object plus blocks with self_attn / mlp / norms
# ---------------------------------------------------------------------------------------------


class FakeConfig:
    def __init__(self, layers: int, hidden: int):
        self.text = types.SimpleNamespace(num_hidden_layers=layers, hidden_size=hidden)

    def get_text_config(self, decoder=False):
        return self.text


class Block(nn.Module):
    def __init__(self, width: int, attn: str = "self_attn", ffn: str = "mlp"):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(width)
        setattr(self, attn, nn.Linear(width, width))
        self.post_attention_layernorm = nn.LayerNorm(width)
        setattr(self, ffn, nn.Linear(width, width))


def blocks(n: int, width: int, **kw) -> nn.ModuleList:
    return nn.ModuleList(Block(width, **kw) for _ in range(n))


class FakeVLM(nn.Module):
    """A vision tower (6 layers, width 64) declared *after* the text model (2 layers, width 32), so a naive
    "last / longest / widest ModuleList" rule would pick the vision tower."""

    def __init__(self, with_get_decoder: bool = True):
        super().__init__()
        self.config = FakeConfig(2, 32)
        self.language_model = nn.Module()
        self.language_model.layers = blocks(2, 32)
        self.vision_tower = nn.Module()
        self.vision_tower.encoder = nn.Module()
        self.vision_tower.encoder.layers = blocks(6, 64)
        self.multi_modal_projector = nn.Linear(64, 32)
        if with_get_decoder:
            self.get_decoder = lambda: self.language_model


class Strange(nn.Module):
    """An architecture locate cannot know: odd names everywhere."""

    def __init__(self):
        super().__init__()
        self.config = FakeConfig(3, 16)
        self.trunk = nn.Module()
        self.trunk.stages = blocks(3, 16, attn="mixer_x", ffn="channel_mix")
        self.eye = nn.Module()
        self.eye.stages = blocks(5, 24)


# ---------------------------------------------------------------------------------------------
# Plain language models from tiny configs
# ---------------------------------------------------------------------------------------------


def _lm(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                  num_hidden_layers=3, num_attention_heads=4))
    if name == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=64, n_embd=32, n_layer=3, n_head=4, n_positions=64,
                                                bos_token_id=1, eos_token_id=2))
    if name == "opt":
        return tf.OPTForCausalLM(tf.OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3, ffn_dim=64,
                                              num_attention_heads=4, word_embed_proj_dim=32,
                                              max_position_embeddings=64))
    if name == "bloom":
        return tf.BloomForCausalLM(tf.BloomConfig(vocab_size=64, hidden_size=32, n_layer=3, n_head=4))
    if name == "t5":
        return tf.T5ForConditionalGeneration(tf.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=4,
                                                         num_decoder_layers=3, num_heads=4))
    if name == "bert":
        return tf.BertLMHeadModel(tf.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3,
                                                num_attention_heads=4, intermediate_size=64, is_decoder=True))
    raise KeyError(name)


LM_EXPECT = {  # layers path, attn (relative), mlp (relative), mlp_in (relative)
    "llama": ("model.layers", "self_attn", "mlp", "mlp"),
    "gpt2": ("transformer.h", "attn", "mlp", "mlp"),
    "opt": ("model.decoder.layers", "self_attn", "fc2", "fc1"),
    "bloom": ("transformer.h", "self_attention.dense", "mlp.dense_4h_to_h", "mlp"),
    "t5": ("decoder.block", "layer.0.SelfAttention", "layer.2.DenseReluDense", "layer.2.DenseReluDense"),
    "bert": ("bert.encoder.layer", "attention.output.dense", "output.dense", "intermediate"),
}


@pytest.mark.parametrize("name", sorted(LM_EXPECT))
def test_plain_language_models(name):
    model = _lm(name).eval()
    stack = locate(model)
    path, attn, mlp, mlp_in = LM_EXPECT[name]
    assert stack.layers_path == path
    assert len(stack) == 3 and stack.hidden_size == 32
    last = stack[-1]
    assert last.paths == {"block": f"{path}.2", "attn": f"{path}.2.{attn}", "mlp": f"{path}.2.{mlp}",
                          "mlp_in": f"{path}.2.{mlp_in}"}
    assert model.get_submodule(last.paths["mlp"]) is last.mlp
    # the FFN output hook changes the output of a causal LM
    ids = torch.tensor([[3, 4, 5, 6]])
    kw = dict(decoder_input_ids=ids) if name == "t5" else {}
    with torch.no_grad():
        base = model(input_ids=ids, **kw).logits
        h = last.mlp.register_forward_hook(lambda m, a, o: (o[0] if isinstance(o, tuple) else o) * 1.5 + 0.1)
        edited = model(input_ids=ids, **kw).logits
        h.remove()
    assert not torch.equal(base, edited)


def test_t5_stack_is_the_decoder_not_the_encoder():
    stack = locate(_lm("t5"))  # encoder has 4 blocks, decoder 3
    assert stack.layers_path == "decoder.block" and len(stack) == 3


# ---------------------------------------------------------------------------------------------
# Override path
# ---------------------------------------------------------------------------------------------


def test_override_path():
    arch = ARCHS["llava"]()
    stack = locate(arch.model, layers="model.language_model.layers")
    assert stack.how == "override"
    assert stack.layers_path == "model.language_model.layers"
    assert stack[0].block is arch.model.model.language_model.layers[0]


def test_override_that_disagrees_with_the_config_warns_but_obeys():
    model = FakeVLM()
    with pytest.warns(UserWarning, match="6 layers"):
        stack = locate(model, layers="vision_tower.encoder.layers")
    assert len(stack) == 6 and stack.how == "override"


@pytest.mark.parametrize("bad", ["model.language_model.layerz", "model.language_model", "model..layers", ""])
def test_bad_override_raises(bad):
    arch = ARCHS["llava"]()
    with pytest.raises(ValueError) as e:        # a LocateError, caught as the ValueError it is
        locate(arch.model, layers=bad)
    assert type(e.value) is LocateError
    msg = str(e.value)
    assert repr(bad) in msg
    assert "model.language_model.layers: 2" in msg and "model.vision_tower.encoder.layers: 4" in msg
    assert 'locate(model, layers="model.language_model.layers")' in msg


# ---------------------------------------------------------------------------------------------
# Unknown architectures
# ---------------------------------------------------------------------------------------------


def test_unknown_architecture_lists_candidates_and_the_override():
    with pytest.raises(LocateError) as e:
        locate(Strange())
    msg = str(e.value)
    assert "Strange" in msg
    assert "trunk.stages: 3" in msg and "eye.stages: 5" in msg  # every ModuleList, with its length
    assert "locate(model, layers=" in msg


def test_unknown_architecture_works_with_the_override_when_layers_are_recognisable():
    model = Strange()
    model.trunk.stages = blocks(3, 16)  # standard child names now, but still an odd list name
    with pytest.raises(LocateError):
        locate(model)
    stack = locate(model, layers="trunk.stages")
    assert len(stack) == 3 and stack[0].paths["attn"] == "trunk.stages.0.self_attn"


def test_override_to_layers_without_attention_or_ffn_raises():
    with pytest.raises(LocateError, match="no attention module"):
        locate(Strange(), layers="trunk.stages")


def test_model_without_modulelist():
    with pytest.raises(LocateError, match="no nn.ModuleList"):
        locate(nn.Sequential(nn.Linear(2, 2)))


# ---------------------------------------------------------------------------------------------
# Never the vision tower
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_get_decoder", [True, False])
def test_vision_tower_deeper_and_wider_is_never_returned(with_get_decoder):
    model = FakeVLM(with_get_decoder)
    stack = locate(model)
    assert stack.layers_path == "language_model.layers"
    assert stack.how == ("get_decoder" if with_get_decoder else "known path")
    assert len(stack) == 2 and stack.hidden_size == 32


def test_rule_skips_a_vision_list_that_comes_last():
    model = nn.Module()
    model.config = FakeConfig(2, 32)
    model.text = nn.Module()  # unknown name: no known path matches
    model.text.layers = blocks(2, 32)
    model.vision_tower = nn.Module()  # registered last, with the text stack's count and width
    model.vision_tower.layers = blocks(2, 32)
    stack = locate(model)
    assert stack.how == "rule" and stack.layers_path == "text.layers"


def test_width_is_inferred_without_a_config():
    model = nn.Module()
    model.model = nn.Module()
    model.model.layers = blocks(3, 24)
    stack = locate(model)
    assert stack.layers_path == "model.layers" and stack.hidden_size == 24 and stack.text_config is None


def test_wrong_width_is_rejected():
    model = FakeVLM(with_get_decoder=False)
    model.language_model.layers = blocks(2, 48)  # right count, wrong width
    with pytest.raises(LocateError, match="width"):
        locate(model)


def test_get_decoder_pointing_at_vision_is_ignored():
    model = FakeVLM()
    model.get_decoder = lambda: model.vision_tower.encoder
    assert locate(model).layers_path == "language_model.layers"


@pytest.mark.parametrize("name", ["llava", "kosmos2", "idefics2", "blip2", "qwen2_vl", "git", "florence2"])
def test_real_vlms_with_deeper_wider_vision(name):
    arch = ARCHS[name]()
    stack = locate(arch.model)
    tc = arch.model.config.get_text_config(decoder=True)
    assert len(stack) == (getattr(tc, "decoder_layers", None) or tc.num_hidden_layers)
    assert not any(w in stack.layers_path for w in ("vision", "visual", "image", "qformer", "perceiver"))
    vision = [m for n, m in arch.model.named_modules() if isinstance(m, nn.ModuleList) and n != stack.layers_path
              and len(m) > len(stack)]
    assert vision, "fixture should have a deeper stack"


# ---------------------------------------------------------------------------------------------
# TextStack API: sequence protocol, paths, describe
# ---------------------------------------------------------------------------------------------


def test_sequence_protocol_and_paths():
    arch = ARCHS["mllama"]()  # 3 layers, the middle one is a gated cross-attention layer
    stack = locate(arch.model)
    assert isinstance(stack, TextStack)
    assert len(stack) == stack.num_layers == 3
    assert isinstance(stack[0], Layer) and stack[-1].index == 2
    assert [ly.index for ly in stack[-2:]] == [1, 2]
    assert [ly.index for ly in stack] == [0, 1, 2]
    assert [ly.attn_kind for ly in stack] == ["self", "cross", "self"]
    assert stack.text_config is arch.model.config.get_text_config(decoder=True)
    for ly in stack:
        assert set(ly.paths) == {"block", "attn", "mlp", "mlp_in"}
        for role, path in ly.paths.items():
            assert arch.model.get_submodule(path) is getattr(ly, role)
    assert stack[1].paths["attn"] == "model.language_model.layers.1.cross_attn"


def test_describe_is_readable():
    stack = locate(ARCHS["blip2"]().model)
    text = stack.describe()
    assert text.splitlines()[0].startswith("Blip2ForConditionalGeneration: 2 text layers at "
                                           "`language_model.model.decoder.layers`")
    assert "OPTAttention" in text and "fc2 [Linear] (input: 0.fc1)" in text
    assert len(text.splitlines()) == 1 + len(stack)
    assert "TextStack" in repr(stack) and "Layer(0" in repr(stack[0])


def test_locate_does_not_touch_the_model():
    arch = ARCHS["llava"]()
    before = {k: v.clone() for k, v in arch.model.state_dict().items()}
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in arch.model.modules())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        locate(arch.model)
    after = arch.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert hooks == sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in arch.model.modules())


# ---------------------------------------------------------------------------------------------
# Full-size default configs, built on the meta device (no memory, no weights): real layer counts and widths
# ---------------------------------------------------------------------------------------------

FULL_SIZE = {  # model_type: (layers path, attention kinds present)
    "llava": ("model.language_model.layers", {"self"}),
    "qwen2_vl": ("model.language_model.layers", {"self"}),
    "qwen3_5": ("model.language_model.layers", {"self", "linear"}),
    "mllama": ("model.language_model.layers", {"self", "cross"}),
    "idefics": ("model.layers", {"self"}),
    "blip-2": ("language_model.model.decoder.layers", {"self"}),
    "pix2struct": ("decoder.layer", {"self"}),
    "udop": ("decoder.block", {"self"}),
    "pi0": ("model.vlm.language_model.layers", {"self"}),
    "vision-encoder-decoder": ("decoder.bert.encoder.layer", {"self"}),
}


@pytest.mark.parametrize("model_type", sorted(FULL_SIZE))
def test_full_size_default_configs_on_meta(model_type):
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES as NAMES

    cfg = tf.AutoConfig.for_model(model_type)
    with torch.device("meta"):
        model = getattr(tf, NAMES[model_type])(cfg)
    stack = locate(model)
    path, kinds = FULL_SIZE[model_type]
    assert stack.layers_path == path
    assert {ly.attn_kind for ly in stack} == kinds
    tc = cfg.get_text_config(decoder=True)
    if model_type == "pi0":  # PI0Config is its own "text config" without sizes; locate reads vlm_config's instead
        tc = cfg.vlm_config.get_text_config(decoder=True)
        assert stack.text_config is tc
    assert stack.hidden_size == tc.hidden_size
    assert len(stack) in {getattr(tc, k, None) for k in ("num_hidden_layers", "decoder_layers", "num_decoder_layers")}


def test_nnsight_wrapper_is_unwrapped():
    nnsight = pytest.importorskip("nnsight")
    arch = ARCHS["llava"]()
    stack = locate(nnsight.NNsight(arch.model))
    assert stack.model is arch.model and stack.layers_path == "model.language_model.layers"


def test_not_a_module():
    with pytest.raises(TypeError, match="nn.Module"):
        locate(object())
