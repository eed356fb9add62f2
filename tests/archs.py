"""Tiny, offline, deterministic builders for image-text-to-text architectures.

Every builder makes a random model from a hand-written config (no hub access) whose **vision tower
is deeper and wider than the text decoder** (vision: 4 layers, width 64; text: 2-3 layers, width 32),
so that a locator that picks the wrong stack fails the tests. Exceptions: Fuyu has no vision tower
(a linear patch embedding), and Pix2Struct's decoder cross-attends to its vision encoder, which must
then have the text width (it is still deeper). Each returns an :class:`Arch`: the model in eval mode
(seeded, so two calls give identical weights), a batch-of-one ``inputs`` dict that works for both
``model(**inputs)`` and ``model.generate(**inputs)`` (``input_ids``, ``attention_mask`` and every image
tensor), the image-token id (None when the model has no image placeholder) and a name.

``ARCHS`` holds the builders whose inputs follow that contract; ``EXTRA_ARCHS`` holds the ones that do
not (Pix2Struct: no ``input_ids``, only a decoder prompt).

The input recipes follow ``stack-notes.md`` ("Input recipes"): the number of image tokens in
``input_ids`` is exactly the number of image features the model produces.

Usage::

    from tests.archs import ARCHS
    arch = ARCHS["llava"]()
    logits = arch.model(**arch.inputs).logits
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import transformers as tf
from torch import nn

# ---------------------------------------------------------------------------------------------
# Shared sizes
# ---------------------------------------------------------------------------------------------

VOCAB = 256
IMG = 250  # image placeholder id (inside the vocab)
BOI, EOI = 251, 252  # begin / end of image (or vision start / end) ids
PAD, BOS, EOS = 0, 1, 2
T_HIDDEN, T_LAYERS = 32, 2  # text decoder: the *smaller* stack
V_HIDDEN, V_LAYERS = 64, 4  # vision tower: deeper and wider on purpose

TEXT = dict(  # a Llama-like text config; the family builders drop/rename keys as needed
    vocab_size=VOCAB,
    hidden_size=T_HIDDEN,
    intermediate_size=64,
    num_hidden_layers=T_LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    pad_token_id=PAD,
    bos_token_id=BOS,
    eos_token_id=EOS,
)

VISION = dict(  # CLIP / SigLIP style vision config
    hidden_size=V_HIDDEN,
    intermediate_size=128,
    num_hidden_layers=V_LAYERS,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
)


@dataclass
class Arch:
    """A built tiny model. ``extra`` holds builder flags, e.g. ``forces_cache``: ``generate`` runs the text model
    from ``inputs_embeds``, and transformers then turns ``use_cache=False`` into True (BLIP-2, InstructBLIP)."""

    name: str
    model: nn.Module
    inputs: dict[str, torch.Tensor]
    image_token_id: int | None
    notes: str = ""
    extra: dict = field(default_factory=dict)


def _text(**over) -> dict:
    return {**TEXT, **over}


def _vision(model_type: str, **over) -> dict:
    return {**VISION, "model_type": model_type, **over}


def _words(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 200, (n,), generator=g).tolist()


def _ids(*parts) -> torch.Tensor:
    """Concatenate ints / lists of ints into a [1, T] LongTensor."""
    out: list[int] = []
    for p in parts:
        out.extend(p if isinstance(p, list) else [p])
    return torch.tensor([out], dtype=torch.long)


def _pixels(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


def _finish(name, cls, config, inputs, image_token_id, notes="", **extra) -> Arch:
    torch.manual_seed(0)
    model = cls(config).eval()
    if "attention_mask" not in inputs:
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    return Arch(name, model, inputs, image_token_id, notes, extra)


def _prompt(n_img: int, before: int = 2, after: int = 3, seed: int = 0, img: int = IMG) -> torch.Tensor:
    """BOS, a few words, ``n_img`` image tokens, a few words."""
    w = _words(before + after, seed)
    return _ids(BOS, w[:before], [img] * n_img, w[before:])


# ---------------------------------------------------------------------------------------------
# LLaVA family
# ---------------------------------------------------------------------------------------------


def llava() -> Arch:
    cfg = tf.LlavaConfig(
        vision_config=_vision("clip_vision_model"),
        text_config=_text(model_type="llama"),
        image_token_index=IMG,
        vision_feature_layer=-2,
        image_seq_length=16,
    )
    ids = _prompt(16)  # (32/8)^2 patches, CLS dropped by the "default" strategy
    return _finish("llava", tf.LlavaForConditionalGeneration, cfg,
                   dict(input_ids=ids, pixel_values=_pixels(1, 3, 32, 32)), IMG)


def vipllava() -> Arch:
    cfg = tf.VipLlavaConfig(
        vision_config=_vision("clip_vision_model"),
        text_config=_text(model_type="llama"),
        image_token_index=IMG,
        vision_feature_layer=[-2, -3, -4, -1],
        image_seq_length=16,
    )
    ids = _prompt(16)
    return _finish("vipllava", tf.VipLlavaForConditionalGeneration, cfg,
                   dict(input_ids=ids, pixel_values=_pixels(1, 3, 32, 32)), IMG)


def llava_next() -> Arch:
    cfg = tf.LlavaNextConfig(
        vision_config=_vision("clip_vision_model"),
        text_config=_text(model_type="llama"),
        image_token_index=IMG,
        image_grid_pinpoints=[[32, 32]],
        image_seq_length=16,
    )
    # base tile 16 + one 4x4 high-res tile (16) + one newline per row (4) = 36
    ids = _prompt(36)
    inputs = dict(input_ids=ids, pixel_values=_pixels(1, 2, 3, 32, 32), image_sizes=torch.tensor([[32, 32]]))
    return _finish("llava_next", tf.LlavaNextForConditionalGeneration, cfg, inputs, IMG)


def llava_onevision() -> Arch:
    cfg = tf.LlavaOnevisionConfig(
        vision_config=_vision("siglip_vision_model"),
        text_config=_text(model_type="qwen2"),
        image_token_index=IMG,
        video_token_index=253,
        image_grid_pinpoints=[[32, 32]],
    )
    ids = _prompt(36)
    inputs = dict(input_ids=ids, pixel_values=_pixels(1, 2, 3, 32, 32), image_sizes=torch.tensor([[32, 32]]))
    return _finish("llava_onevision", tf.LlavaOnevisionForConditionalGeneration, cfg, inputs, IMG)


def llava_next_video() -> Arch:
    cfg = tf.LlavaNextVideoConfig(
        vision_config=_vision("clip_vision_model"),
        text_config=_text(model_type="llama"),
        image_token_index=IMG,
        video_token_index=253,
        image_grid_pinpoints=[[32, 32]],
        image_seq_length=16,
    )
    ids = _prompt(36)
    inputs = dict(input_ids=ids, pixel_values=_pixels(1, 2, 3, 32, 32), image_sizes=torch.tensor([[32, 32]]))
    return _finish("llava_next_video", tf.LlavaNextVideoForConditionalGeneration, cfg, inputs, IMG)


def video_llava() -> Arch:
    cfg = tf.VideoLlavaConfig(
        vision_config=_vision("clip_vision_model"),
        text_config=_text(model_type="llama"),
        image_token_index=IMG,
        video_token_index=253,
        image_seq_length=16,
    )
    ids = _prompt(16)  # the default strategy drops CLS
    return _finish("video_llava", tf.VideoLlavaForConditionalGeneration, cfg,
                   dict(input_ids=ids, pixel_values_images=_pixels(1, 3, 32, 32)), IMG)


def mistral3() -> Arch:
    cfg = tf.Mistral3Config(
        vision_config=_vision("pixtral", head_dim=16, rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
        text_config=_text(model_type="mistral", head_dim=8),
        image_token_index=IMG,
        spatial_merge_size=2,
    )
    ids = _prompt(4)  # 4x4 patches merged 2x2 -> 4
    inputs = dict(input_ids=ids, pixel_values=_pixels(1, 3, 32, 32), image_sizes=torch.tensor([[32, 32]]))
    return _finish("mistral3", tf.Mistral3ForConditionalGeneration, cfg, inputs, IMG)


def internvl() -> Arch:
    cfg = tf.InternVLConfig(
        vision_config=dict(model_type="internvl_vision", hidden_size=V_HIDDEN, intermediate_size=128,
                           num_hidden_layers=V_LAYERS, num_attention_heads=4, image_size=[32, 32], patch_size=[8, 8]),
        text_config=_text(model_type="qwen2"),
        image_token_id=IMG,
        image_seq_length=4,
    )
    ids = _prompt(4)  # 16 patches, pixel-shuffle 0.5 -> 4
    return _finish("internvl", tf.InternVLForConditionalGeneration, cfg,
                   dict(input_ids=ids, pixel_values=_pixels(1, 3, 32, 32)), IMG)


def got_ocr2() -> Arch:
    cfg = tf.GotOcr2Config(
        vision_config=dict(model_type="got_ocr2_vision", hidden_size=V_HIDDEN, mlp_dim=128, num_hidden_layers=V_LAYERS,
                           num_attention_heads=4, image_size=64, patch_size=8, output_channels=32,
                           window_size=4, global_attn_indexes=[1, 3]),
        text_config=_text(model_type="qwen2"),
        image_token_index=IMG,
        image_seq_length=16,
    )
    ids = _prompt(4)  # 64/8 = 8x8 patches, two stride-2 convolutions in the neck -> 2x2
    return _finish("got_ocr2", tf.GotOcr2ForConditionalGeneration, cfg,
                   dict(input_ids=ids, pixel_values=_pixels(1, 3, 64, 64)), IMG)


def aya_vision() -> Arch:
    cfg = tf.AyaVisionConfig(
        vision_config=_vision("siglip_vision_model"),
        text_config=_text(model_type="cohere2", sliding_window=64, layer_types=["sliding_attention", "full_attention"]),
        image_token_index=IMG,
        downsample_factor=2,
    )
    ids = _prompt(4)
    return _finish("aya_vision", tf.AyaVisionForConditionalGeneration, cfg,
                   dict(input_ids=ids, pixel_values=_pixels(1, 3, 32, 32)), IMG)


def cohere2_vision() -> Arch:
    cfg = tf.Cohere2VisionConfig(
        vision_config=_vision("siglip_vision_model"),
        text_config=_text(model_type="cohere2", sliding_window=64, layer_types=["sliding_attention", "full_attention"]),
        image_token_id=IMG,
        downsample_factor=2,
        alignment_intermediate_size=64,
    )
    ids = _prompt(4)
    return _finish("cohere2_vision", tf.Cohere2VisionForConditionalGeneration, cfg,
                   dict(input_ids=ids, pixel_values=_pixels(1, 3, 32, 32)), IMG)


def deepseek_vl() -> Arch:
    cfg = tf.DeepseekVLConfig(
        vision_config=_vision("siglip_vision_model"),
        text_config=_text(model_type="llama"),
        image_token_id=IMG,
    )
    ids = _prompt(16)
    return _finish("deepseek_vl", tf.DeepseekVLForConditionalGeneration, cfg,
                   dict(input_ids=ids, pixel_values=_pixels(1, 3, 32, 32)), IMG)


# ---------------------------------------------------------------------------------------------
# Gemma family
# ---------------------------------------------------------------------------------------------


def paligemma() -> Arch:
    cfg = tf.PaliGemmaConfig(
        vision_config=_vision("siglip_vision_model", projection_dim=T_HIDDEN),
        text_config=_text(model_type="gemma", head_dim=8),
        image_token_index=IMG,
        vocab_size=VOCAB,
        projection_dim=T_HIDDEN,
        hidden_size=T_HIDDEN,
    )
    w = _words(4, 0)
    ids = _ids([IMG] * 16, BOS, w)  # PaliGemma: image tokens *before* BOS
    return _finish("paligemma", tf.PaliGemmaForConditionalGeneration, cfg,
                   dict(input_ids=ids, pixel_values=_pixels(1, 3, 32, 32)), IMG)


def gemma3() -> Arch:
    cfg = tf.Gemma3Config(
        vision_config=_vision("siglip_vision_model"),
        text_config=_text(model_type="gemma3_text", head_dim=8, query_pre_attn_scalar=8, sliding_window=64),
        mm_tokens_per_image=4,
        boi_token_index=BOI,
        eoi_token_index=EOI,
        image_token_index=IMG,
    )
    w = _words(4, 0)
    ids = _ids(BOS, w[:2], BOI, [IMG] * 4, EOI, w[2:])
    return _finish("gemma3", tf.Gemma3ForConditionalGeneration, cfg,
                   dict(input_ids=ids, pixel_values=_pixels(1, 3, 32, 32)), IMG)


def gemma4() -> Arch:
    cfg = tf.Gemma4Config(
        vision_config=dict(hidden_size=V_HIDDEN, intermediate_size=128, num_hidden_layers=V_LAYERS,
                           num_attention_heads=4, num_key_value_heads=4, head_dim=16, patch_size=8,
                           pooling_kernel_size=2, position_embedding_size=64),
        text_config=_text(head_dim=8, global_head_dim=8, sliding_window=64, hidden_size_per_layer_input=8,
                          vocab_size_per_layer_input=VOCAB, layer_types=["sliding_attention", "full_attention"]),
        audio_config=None,
        boi_token_id=BOI, eoi_token_id=EOI, image_token_id=IMG, video_token_id=253, boa_token_id=254,
        eoa_token_index=255, audio_token_id=249,
    )
    w = _words(4, 0)
    ids = _ids(BOS, w[:2], BOI, [IMG] * 4, EOI, w[2:])
    # 4x4 patches of 8x8 px, each row (x, y); pooled 2x2 -> 4 soft tokens
    pos = torch.stack(torch.meshgrid(torch.arange(4), torch.arange(4), indexing="xy"), -1).reshape(1, 16, 2)
    inputs = dict(input_ids=ids, pixel_values=_pixels(1, 16, 3 * 8 * 8), image_position_ids=pos,
                  mm_token_type_ids=(ids == IMG).int())
    return _finish("gemma4", tf.Gemma4ForConditionalGeneration, cfg, inputs, IMG)


# ---------------------------------------------------------------------------------------------
# Idefics family (pixel_values [B, n_images, 3, H, W])
# ---------------------------------------------------------------------------------------------


def idefics2() -> Arch:
    cfg = tf.Idefics2Config(
        vision_config=dict(model_type="idefics2_vision", hidden_size=V_HIDDEN, intermediate_size=128,
                           num_hidden_layers=V_LAYERS, num_attention_heads=4, image_size=32, patch_size=8),
        perceiver_config=dict(model_type="idefics2_perceiver", hidden_size=T_HIDDEN, resampler_n_latents=4,
                              resampler_depth=1, resampler_n_heads=2, resampler_head_dim=8, num_key_value_heads=1),
        text_config=_text(model_type="mistral", head_dim=8),
        image_token_id=IMG,
    )
    ids = _prompt(4)
    return _finish("idefics2", tf.Idefics2ForConditionalGeneration, cfg,
                   dict(input_ids=ids, pixel_values=_pixels(1, 1, 3, 32, 32)), IMG)


def idefics3() -> Arch:
    cfg = tf.Idefics3Config(
        vision_config=dict(model_type="idefics3_vision", hidden_size=V_HIDDEN, intermediate_size=128,
                           num_hidden_layers=V_LAYERS, num_attention_heads=4, image_size=32, patch_size=8),
        text_config=_text(model_type="llama"),
        image_token_id=IMG,
        scale_factor=2,
    )
    ids = _prompt(4)
    return _finish("idefics3", tf.Idefics3ForConditionalGeneration, cfg,
                   dict(input_ids=ids, pixel_values=_pixels(1, 1, 3, 32, 32)), IMG)


def smolvlm() -> Arch:
    cfg = tf.SmolVLMConfig(
        vision_config=dict(model_type="smolvlm_vision", hidden_size=V_HIDDEN, intermediate_size=128,
                           num_hidden_layers=V_LAYERS, num_attention_heads=4, image_size=32, patch_size=8),
        text_config=_text(model_type="llama"),
        image_token_id=IMG,
        scale_factor=2,
    )
    ids = _prompt(4)
    return _finish("smolvlm", tf.SmolVLMForConditionalGeneration, cfg,
                   dict(input_ids=ids, pixel_values=_pixels(1, 1, 3, 32, 32)), IMG)


# ---------------------------------------------------------------------------------------------
# Qwen-VL family / GLM-4V (flat patches, image_grid_thw, M-RoPE -> mm_token_type_ids)
# ---------------------------------------------------------------------------------------------

MROPE = dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 1, 1])  # head_dim 8 -> 4 rotary pairs


def _qwen_inputs(patch: int, merge: int = 2, temporal: int = 2, grid: int = 4) -> dict:
    n_patches = grid * grid
    n_tok = n_patches // (merge * merge)
    w = _words(5, 0)
    ids = _ids(BOS, w[:2], BOI, [IMG] * n_tok, EOI, w[2:])
    return dict(
        input_ids=ids,
        pixel_values=_pixels(n_patches, 3 * temporal * patch * patch),
        image_grid_thw=torch.tensor([[1, grid, grid]]),
        mm_token_type_ids=(ids == IMG).int(),
    )


_QWEN_IDS = dict(image_token_id=IMG, video_token_id=253, vision_start_token_id=BOI, vision_end_token_id=EOI)


def qwen2_vl() -> Arch:
    cfg = tf.Qwen2VLConfig(
        vision_config=dict(depth=V_LAYERS, embed_dim=V_HIDDEN, hidden_size=T_HIDDEN, num_heads=4, mlp_ratio=2,
                           patch_size=4, spatial_merge_size=2, temporal_patch_size=2),
        text_config=_text(rope_parameters=MROPE),
        **_QWEN_IDS,
    )
    return _finish("qwen2_vl", tf.Qwen2VLForConditionalGeneration, cfg, _qwen_inputs(4), IMG)


def qwen2_5_vl() -> Arch:
    cfg = tf.Qwen2_5_VLConfig(
        vision_config=dict(depth=V_LAYERS, hidden_size=V_HIDDEN, intermediate_size=128, num_heads=4,
                           out_hidden_size=T_HIDDEN, patch_size=4, spatial_merge_size=2, temporal_patch_size=2,
                           window_size=16, fullatt_block_indexes=[1, 3]),
        text_config=_text(rope_parameters=MROPE),
        **_QWEN_IDS,
    )
    return _finish("qwen2_5_vl", tf.Qwen2_5_VLForConditionalGeneration, cfg, _qwen_inputs(4), IMG)


def qwen3_vl() -> Arch:
    cfg = tf.Qwen3VLConfig(
        vision_config=dict(depth=V_LAYERS, hidden_size=V_HIDDEN, intermediate_size=128, num_heads=4,
                           out_hidden_size=T_HIDDEN, patch_size=4, spatial_merge_size=2, temporal_patch_size=2,
                           num_position_embeddings=16, deepstack_visual_indexes=[1, 2]),
        text_config=_text(head_dim=8, rope_parameters=dict(MROPE, mrope_interleaved=True)),
        **_QWEN_IDS,
    )
    return _finish("qwen3_vl", tf.Qwen3VLForConditionalGeneration, cfg, _qwen_inputs(4), IMG)


def glm4v() -> Arch:
    cfg = tf.Glm4vConfig(
        vision_config=dict(depth=V_LAYERS, hidden_size=V_HIDDEN, intermediate_size=128, num_heads=4,
                           out_hidden_size=T_HIDDEN, patch_size=4, spatial_merge_size=2, temporal_patch_size=2,
                           image_size=16),
        text_config=_text(rope_parameters=dict(MROPE, partial_rotary_factor=0.5, mrope_section=[1, 1, 0])),
        image_token_id=IMG, video_token_id=253, image_start_token_id=BOI, image_end_token_id=EOI,
        video_start_token_id=254, video_end_token_id=255,
    )
    return _finish("glm4v", tf.Glm4vForConditionalGeneration, cfg, _qwen_inputs(4), IMG)


def qwen3_vl_moe() -> Arch:
    cfg = tf.Qwen3VLMoeConfig(
        vision_config=dict(depth=V_LAYERS, hidden_size=V_HIDDEN, intermediate_size=128, num_heads=4,
                           out_hidden_size=T_HIDDEN, patch_size=4, spatial_merge_size=2, temporal_patch_size=2,
                           num_position_embeddings=16, deepstack_visual_indexes=[1, 2]),
        text_config=_text(head_dim=8, rope_parameters=dict(MROPE, mrope_interleaved=True), num_experts=4,
                          num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1),
        **_QWEN_IDS,
    )
    return _finish("qwen3_vl_moe", tf.Qwen3VLMoeForConditionalGeneration, cfg, _qwen_inputs(4), IMG,
                   notes="MoE: fused 3-D expert weights")


def qwen3_5() -> Arch:
    cfg = tf.Qwen3_5Config(
        vision_config=dict(depth=V_LAYERS, hidden_size=V_HIDDEN, intermediate_size=128, num_heads=4,
                           out_hidden_size=T_HIDDEN, patch_size=4, spatial_merge_size=2, temporal_patch_size=2,
                           num_position_embeddings=16),
        text_config=_text(head_dim=8, rope_parameters=dict(MROPE, mrope_interleaved=True, partial_rotary_factor=1.0),
                          layer_types=["linear_attention", "full_attention"], linear_conv_kernel_dim=2,
                          linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
                          linear_num_value_heads=4),
        **_QWEN_IDS,
    )
    return _finish("qwen3_5", tf.Qwen3_5ForConditionalGeneration, cfg, _qwen_inputs(4), IMG,
                   notes="hybrid: layer 0 is gated-delta-net linear attention (`linear_attn`)")


# ---------------------------------------------------------------------------------------------
# Q-Former family (BLIP-2 with OPT, InstructBLIP with Llama)
# ---------------------------------------------------------------------------------------------


def _blip_vision(model_type):
    return dict(model_type=model_type, hidden_size=V_HIDDEN, intermediate_size=128, num_hidden_layers=V_LAYERS,
                num_attention_heads=4, image_size=32, patch_size=8)


def _qformer(model_type):
    return dict(model_type=model_type, vocab_size=VOCAB, hidden_size=T_HIDDEN, num_hidden_layers=1,
                num_attention_heads=4, intermediate_size=64, encoder_hidden_size=V_HIDDEN, max_position_embeddings=64)


def blip2() -> Arch:
    cfg = tf.Blip2Config(
        vision_config=_blip_vision("blip_2_vision_model"),
        qformer_config=_qformer("blip_2_qformer"),
        text_config=dict(model_type="opt", vocab_size=VOCAB, hidden_size=T_HIDDEN, num_hidden_layers=T_LAYERS,
                         ffn_dim=64, num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=T_HIDDEN,
                         pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS),
        num_query_tokens=4,
        image_token_index=IMG,
    )
    ids = _ids([IMG] * 4, BOS, _words(5, 0))
    return _finish("blip2", tf.Blip2ForConditionalGeneration, cfg,
                   dict(input_ids=ids, pixel_values=_pixels(1, 3, 32, 32)), IMG,
                   notes="OPT: no MLP wrapper; fc2 output is flattened [B*T, H]; generate always caches",
                   forces_cache=True)


def instructblip() -> Arch:
    cfg = tf.InstructBlipConfig(
        vision_config=_blip_vision("instructblip_vision_model"),
        qformer_config=_qformer("instructblip_qformer"),
        text_config=_text(model_type="llama"),
        num_query_tokens=4,
        image_token_index=IMG,
    )
    ids = _ids([IMG] * 4, BOS, _words(5, 0))
    q = _ids(_words(4, 1))
    inputs = dict(input_ids=ids, pixel_values=_pixels(1, 3, 32, 32), qformer_input_ids=q,
                  qformer_attention_mask=torch.ones_like(q))
    return _finish("instructblip", tf.InstructBlipForConditionalGeneration, cfg, inputs, IMG,
                   notes="generate always caches", forces_cache=True)


# ---------------------------------------------------------------------------------------------
# Mixture-of-experts and gated cross-attention
# ---------------------------------------------------------------------------------------------


def aria() -> Arch:
    cfg = tf.AriaConfig(
        vision_config=dict(model_type="idefics3_vision", hidden_size=V_HIDDEN, intermediate_size=128,
                           num_hidden_layers=V_LAYERS, num_attention_heads=4, image_size=32, patch_size=8),
        text_config=_text(moe_num_experts=4, moe_topk=2, moe_num_shared_experts=1),
        projector_patch_to_query_dict={16: 4},
        image_token_index=IMG,
    )
    ids = _prompt(4)
    inputs = dict(input_ids=ids, pixel_values=_pixels(1, 3, 32, 32), pixel_mask=torch.ones(1, 32, 32, dtype=torch.bool))
    return _finish("aria", tf.AriaForConditionalGeneration, cfg, inputs, IMG,
                   notes="MoE: fused 3-D expert weights plus shared experts")


def llama4() -> Arch:
    cfg = tf.Llama4Config(
        # the pixel-shuffle MLP's fc1 takes `intermediate_size` inputs, which must be 4 x hidden (ratio 0.5)
        vision_config=dict(hidden_size=V_HIDDEN, intermediate_size=4 * V_HIDDEN, num_hidden_layers=V_LAYERS,
                           num_attention_heads=4, image_size=32, patch_size=8, vision_output_dim=T_HIDDEN,
                           projector_input_dim=T_HIDDEN, projector_output_dim=T_HIDDEN, pixel_shuffle_ratio=0.5),
        text_config=_text(intermediate_size_mlp=64, num_local_experts=2, head_dim=8, attention_chunk_size=64),
        boi_token_index=BOI,
        eoi_token_index=EOI,
        image_token_index=IMG,
    )
    w = _words(4, 0)
    ids = _ids(BOS, w[:2], BOI, [IMG] * 4, EOI, w[2:])
    arch = _finish("llama4", tf.Llama4ForConditionalGeneration, cfg,
                   dict(input_ids=ids, pixel_values=_pixels(1, 3, 32, 32)), IMG,
                   notes="MoE feed_forward returns a tuple with flattened [B*T, H] activations")
    _patch_llama4(arch.model)
    return arch


def _patch_llama4(model) -> None:
    """Work around a transformers 5.24 bug: ``Llama4ForConditionalGeneration.forward`` reads
    ``outputs.image_outputs`` from the text model's ``MoeCausalLMOutputWithPast``, which has no such field,
    so every forward raises AttributeError. A forward hook on the text model adds the field (None).
    The hook belongs to the fixture, not to unike; it sits on ``model.language_model`` (not on a layer)."""
    lm = model.language_model

    def add_field(module, args, output):
        if not hasattr(output, "image_outputs"):
            output.image_outputs = None

    lm.register_forward_hook(add_field)


def mllama() -> Arch:
    cfg = tf.MllamaConfig(
        vision_config=dict(hidden_size=V_HIDDEN, intermediate_size=128, num_hidden_layers=V_LAYERS, num_global_layers=1,
                           attention_heads=4, image_size=32, patch_size=8, vision_output_dim=2 * V_HIDDEN,
                           max_num_tiles=1, intermediate_layers_indices=[1], supported_aspect_ratios=[[1, 1]]),
        text_config=_text(num_hidden_layers=3, cross_attention_layers=[1]),
        image_token_index=IMG,
    )
    ids = _ids(BOS, IMG, _words(4, 0))
    T = ids.shape[1]
    inputs = dict(
        input_ids=ids,
        pixel_values=_pixels(1, 1, 1, 3, 32, 32),
        aspect_ratio_ids=torch.tensor([[1]]),
        aspect_ratio_mask=torch.ones(1, 1, 1, dtype=torch.long),
        cross_attention_mask=torch.ones(1, T, 1, 1, dtype=torch.long),
    )
    return _finish("mllama", tf.MllamaForConditionalGeneration, cfg, inputs, IMG,
                   notes="layer 1 is a gated cross-attention layer (tanh(gate)=0 at init)")


# ---------------------------------------------------------------------------------------------
# Others: LFM2-VL, Kosmos-2, Fuyu, GIT, Florence-2
# ---------------------------------------------------------------------------------------------


def lfm2_vl() -> Arch:
    cfg = tf.Lfm2VlConfig(
        vision_config=dict(model_type="siglip2_vision_model", hidden_size=V_HIDDEN, intermediate_size=128,
                           num_hidden_layers=V_LAYERS, num_attention_heads=4, patch_size=8, num_patches=16),
        text_config=dict(model_type="lfm2", vocab_size=VOCAB, hidden_size=T_HIDDEN, intermediate_size=64,
                         num_hidden_layers=T_LAYERS, num_attention_heads=4, num_key_value_heads=2,
                         layer_types=["conv", "full_attention"], block_auto_adjust_ff_dim=False,
                         max_position_embeddings=256, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS),
        image_token_id=IMG,
        projector_hidden_size=64,
        downsample_factor=2,
    )
    ids = _prompt(4)
    inputs = dict(input_ids=ids, pixel_values=_pixels(1, 16, 3 * 8 * 8), spatial_shapes=torch.tensor([[4, 4]]),
                  pixel_attention_mask=torch.ones(1, 16, dtype=torch.bool))
    return _finish("lfm2_vl", tf.Lfm2VlForConditionalGeneration, cfg, inputs, IMG,
                   notes="layer 0 is a short-conv layer (no self-attention)")


def kosmos2() -> Arch:
    cfg = tf.Kosmos2Config(
        text_config=dict(vocab_size=VOCAB, embed_dim=T_HIDDEN, layers=T_LAYERS, ffn_dim=64, attention_heads=4,
                         max_position_embeddings=256, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS),
        vision_config=dict(hidden_size=V_HIDDEN, intermediate_size=128, num_hidden_layers=V_LAYERS,
                           num_attention_heads=4, image_size=32, patch_size=8),
        latent_query_num=4,
    )
    w = _words(4, 0)
    ids = _ids(BOS, BOI, [IMG] * 4, EOI, w)
    mask = torch.zeros_like(ids)
    mask[0, 2:6] = 1
    inputs = dict(input_ids=ids, pixel_values=_pixels(1, 3, 32, 32), image_embeds_position_mask=mask)
    return _finish("kosmos2", tf.Kosmos2ForConditionalGeneration, cfg, inputs, IMG)


def fuyu() -> Arch:
    cfg = tf.FuyuConfig(
        text_config=dict(model_type="persimmon", vocab_size=VOCAB, hidden_size=T_HIDDEN, intermediate_size=64,
                         num_hidden_layers=T_LAYERS, num_attention_heads=4, max_position_embeddings=256,
                         pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS),
        image_size=32,
        patch_size=8,
        image_token_id=IMG,
    )
    ids = _prompt(16)
    inputs = dict(input_ids=ids, image_patches=_pixels(1, 16, 8 * 8 * 3))
    return _finish("fuyu", tf.FuyuForCausalLM, cfg, inputs, IMG,
                   notes="no vision tower: a linear patch embedding feeds the decoder")


def git() -> Arch:
    cfg = tf.GitConfig(
        vision_config=dict(hidden_size=V_HIDDEN, intermediate_size=128, num_hidden_layers=V_LAYERS,
                           num_attention_heads=4, image_size=32, patch_size=8),
        vocab_size=VOCAB, hidden_size=T_HIDDEN, num_hidden_layers=T_LAYERS, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=256, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
    )
    ids = _ids(BOS, _words(4, 0))
    return _finish("git", tf.GitForCausalLM, cfg, dict(input_ids=ids, pixel_values=_pixels(1, 3, 32, 32)), None,
                   notes="no image tokens: image features are prepended inside the model (logits are longer)")


def florence2() -> Arch:
    cfg = tf.Florence2Config(
        vision_config=dict(depths=[1, 1, 1, 1], embed_dim=[16, 32, 48, 64], num_heads=[1, 2, 2, 4],
                           num_groups=[1, 2, 2, 4], window_size=2, projection_dim=T_HIDDEN, drop_path_rate=0.0),
        text_config=dict(model_type="bart", vocab_size=VOCAB, d_model=T_HIDDEN, encoder_layers=T_LAYERS,
                         decoder_layers=T_LAYERS, encoder_attention_heads=4, decoder_attention_heads=4,
                         encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=256,
                         pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, decoder_start_token_id=EOS),
        image_token_id=IMG,
    )
    # DaViT strides 4*2*2*2 = 32: a 64 px image gives 2x2 spatial tokens + 1 pooled token = 5
    ids = _ids([IMG] * 5, BOS, _words(4, 0), EOS)
    inputs = dict(input_ids=ids, pixel_values=_pixels(1, 3, 64, 64), decoder_input_ids=_ids(EOS, BOS, _words(1, 1)))
    return _finish("florence2", tf.Florence2ForConditionalGeneration, cfg, inputs, IMG,
                   notes="encoder-decoder (BART): the located stack is the text decoder")


def blip() -> Arch:
    cfg = tf.BlipConfig(
        text_config=dict(vocab_size=VOCAB, hidden_size=T_HIDDEN, encoder_hidden_size=V_HIDDEN, intermediate_size=64,
                         num_hidden_layers=T_LAYERS, num_attention_heads=4, max_position_embeddings=256,
                         pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, sep_token_id=EOS),
        vision_config=dict(hidden_size=V_HIDDEN, intermediate_size=128, num_hidden_layers=V_LAYERS,
                           num_attention_heads=4, image_size=32, patch_size=8),
    )
    ids = _ids(BOS, _words(4, 0))
    return _finish("blip", tf.BlipForConditionalGeneration, cfg,
                   dict(input_ids=ids, pixel_values=_pixels(1, 3, 32, 32)), None,
                   notes="BERT-style text decoder with cross-attention to the image; no image tokens")


def idefics() -> Arch:
    cfg = tf.IdeficsConfig(
        vocab_size=VOCAB, hidden_size=T_HIDDEN, intermediate_size=64, num_hidden_layers=T_LAYERS,
        num_attention_heads=4, max_position_embeddings=256, cross_layer_interval=1,
        pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
        vision_config=dict(embed_dim=V_HIDDEN, intermediate_size=128, num_hidden_layers=V_LAYERS,
                           num_attention_heads=4, image_size=32, patch_size=8),
    )
    ids = _ids(BOS, IMG, _words(4, 0))
    inputs = dict(input_ids=ids, pixel_values=_pixels(1, 1, 3, 32, 32),
                  image_attention_mask=torch.ones(1, ids.shape[1], 1, dtype=torch.long))
    return _finish("idefics", tf.IdeficsForVisionText2Text, cfg, inputs, IMG,
                   notes="gated cross-attention blocks live in a separate list (gated_cross_attn_layers)")


def janus() -> Arch:
    cfg = tf.JanusConfig(
        text_config=_text(model_type="llama"),
        vision_config=dict(hidden_size=V_HIDDEN, num_hidden_layers=V_LAYERS, num_attention_heads=4, image_size=32,
                           patch_size=8, mlp_ratio=2.0, projection_dim=T_HIDDEN, num_image_tokens=16),
        vq_config=dict(embed_dim=4, num_embeddings=16, latent_channels=32, base_channels=32,  # GroupNorm(32)
                       channel_multiplier=[1, 1], num_res_blocks=1, num_patches=4, projection_dim=T_HIDDEN,
                       image_token_embed_dim=T_HIDDEN),
        image_token_id=IMG,
    )
    ids = _prompt(16)
    return _finish("janus", tf.JanusForConditionalGeneration, cfg,
                   dict(input_ids=ids, pixel_values=_pixels(1, 3, 32, 32)), IMG)


def ovis2() -> Arch:
    cfg = tf.Ovis2Config(
        vision_config=dict(hidden_size=V_HIDDEN, intermediate_size=128, num_hidden_layers=V_LAYERS,
                           num_attention_heads=4, image_size=32, patch_size=8, vocab_size=64, hidden_stride=2),
        text_config=_text(model_type="qwen2"),
        image_token_id=IMG,
        visual_indicator_token_ids=[240, 241, 242, 243, 244],
        vocab_size=VOCAB,
        hidden_size=T_HIDDEN,
    )
    ids = _prompt(4)  # 16 patches, hidden_stride 2 -> 4 visual tokens
    return _finish("ovis2", tf.Ovis2ForConditionalGeneration, cfg,
                   dict(input_ids=ids, pixel_values=_pixels(1, 3, 32, 32)), IMG)


def pix2struct() -> Arch:
    """T5-style encoder-decoder whose *encoder is the vision tower*; inputs have no ``input_ids`` (the text prompt
    is the decoder prompt), so this builder lives in ``EXTRA_ARCHS``, not ``ARCHS``."""
    cfg = tf.Pix2StructConfig(
        text_config=dict(vocab_size=VOCAB, hidden_size=T_HIDDEN, d_kv=8, d_ff=64, num_layers=T_LAYERS, num_heads=4,
                         pad_token_id=PAD, eos_token_id=EOS, decoder_start_token_id=PAD),
        # the decoder's cross-attention needs encoder width == decoder width: deeper vision, same width here
        vision_config=dict(hidden_size=T_HIDDEN, patch_embed_hidden_size=8 * 8 * 3, d_ff=128, d_kv=8,
                           num_hidden_layers=V_LAYERS, num_attention_heads=4, seq_len=16),
    )
    rows, cols = torch.meshgrid(torch.arange(1, 5.0), torch.arange(1, 5.0), indexing="ij")
    patches = torch.cat([rows.reshape(16, 1), cols.reshape(16, 1), _pixels(16, 8 * 8 * 3)], -1)[None]
    inputs = dict(flattened_patches=patches, attention_mask=torch.ones(1, 16, dtype=torch.long),
                  decoder_input_ids=_ids(PAD, _words(2, 0)))
    torch.manual_seed(0)
    model = tf.Pix2StructForConditionalGeneration(cfg).eval()
    return Arch("pix2struct", model, inputs, None, "T5-style sub-layers add their own residual; no input_ids")


ARCHS: dict[str, Callable[[], Arch]] = {
    f.__name__: f
    for f in [
        llava, vipllava, llava_next, llava_onevision, llava_next_video, video_llava, mistral3, internvl, got_ocr2,
        aya_vision, cohere2_vision, deepseek_vl, paligemma, gemma3, idefics2, idefics3, smolvlm, qwen2_vl,
        qwen2_5_vl, qwen3_vl, qwen3_vl_moe, qwen3_5, glm4v, gemma4, blip2, instructblip, aria, llama4, mllama,
        lfm2_vl, kosmos2, fuyu, git, florence2, blip, idefics, janus, ovis2,
    ]
}

# Builders whose inputs do not follow the ARCHS contract (no ``input_ids``); the conformance matrix runs them too.
EXTRA_ARCHS: dict[str, Callable[[], Arch]] = {"pix2struct": pix2struct}
