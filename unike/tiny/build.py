"""Build the tiny VLM offline: word-level tokenizer, LLaVA processor with a chat template, model config.

Sequence format (shared with `unike.prompting`): prompt = `processor(text=chat_template(question),
images=[img] or None)`, i.e. `<s> <image>x16 question words`; answer = `tokenizer(" " + answer,
add_special_tokens=False).input_ids + [eos]`; loss on the answer and EOS only; left padding.
In-context demonstrations ("question answer") go before the question, each followed by the word `SEP`
(`JOIN` between texts: what `unike.baselines.PromptIKE` writes by default); an image demonstration is
`<image>x16 question answer SEP` before the query's image.
"""
from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from ..data.world import SynthWorld

SPECIALS = ("<pad>", "<unk>", "<s>", "</s>", "<image>")
IMAGE_SIZE, PATCH = 64, 16
N_IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2  # 16
MEAN, STD = 0.5, 0.25
TEXT_LAYERS = 6  # Llama decoder depth; UniKE edits the last 4 by default, format B hides layers 0-1
SEP = ";"  # the separator word between demonstrations: a whole word to the whitespace pre-tokenizer
JOIN = f" {SEP} "

# "<image> " + question for a user turn with an image, the bare text otherwise; no generation prompt.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<image> ' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- if not loop.last -%}{{ ' ' }}{%- endif -%}"
    "{%- endfor -%}"
)


def build_tokenizer(world: SynthWorld | None = None) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over `world.vocabulary()`, `SEP` and the special tokens; BOS added, left padding."""
    words = sorted({*(world or SynthWorld(0)).vocabulary(), SEP})
    vocab = {tok: i for i, tok in enumerate([*SPECIALS, *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"}, padding_side="left", model_max_length=128)


def build_processor(tokenizer: PreTrainedTokenizerFast) -> LlavaProcessor:
    """LLaVA processor: 64 px images, patch 16 -> 16 image tokens, pixels normalised with mean 0.5, std 0.25."""
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=[MEAN] * 3, image_std=[STD] * 3, do_convert_rgb=True)
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          image_token="<image>", chat_template=CHAT_TEMPLATE)


def build_config(tokenizer: PreTrainedTokenizerFast) -> LlavaConfig:
    """CLIP vision 128 x 4 layers, Llama text 128 hidden x 6 layers, 4 heads, untied embeddings."""
    vision = CLIPVisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                              image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=128)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=512,
                       num_hidden_layers=TEXT_LAYERS,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         image_seq_length=N_IMAGE_TOKENS, vision_feature_layer=-1,
                         vision_feature_select_strategy="default", projector_hidden_act="gelu",
                         tie_word_embeddings=False)
    return config


def build_tiny(world: SynthWorld | None = None, seed: int = 0):
    """A freshly initialised (model, processor) pair."""
    import torch

    tokenizer = build_tokenizer(world)
    processor = build_processor(tokenizer)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(build_config(tokenizer))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model, processor
