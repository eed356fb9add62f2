"""The fixed tables of `SynthWorld`: looks, fact values, text facts, question templates, and what each version
of the world holds."""
from __future__ import annotations

import itertools
from dataclasses import dataclass

from .render import COLOURS

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond", "crescent", "arrow")
TWO_TONES = tuple(f"{a} and {b}" for a, b in itertools.combinations(COLOURS, 2))  # version 2's extra colours
PATTERNS = ("solid", "stripes", "dots", "ring")
VALUES = {
    "kind": ("dragon", "beetle", "spirit", "golem", "fairy", "serpent", "moth", "troll", "phoenix", "goblin"),
    "habitat": ("forest", "desert", "ocean", "mountain", "swamp", "cave", "river", "tundra", "jungle", "volcano"),
    "diet": ("berries", "fish", "honey", "mushrooms", "seeds", "insects", "moss", "crystals"),
    "country": ("zarnia", "velmora", "quentor", "olbrith", "drosk", "pellavia", "yundor", "kastrel",
                "morvane", "theskar"),
}
CAPITALS = dict(zip(VALUES["country"], ("aldrun", "bexmoor", "corvale", "dunhelm", "estrid", "falkor",
                                        "grenby", "holmvik", "istra", "jorvel")))
CLIMATES = dict(zip(VALUES["habitat"], ("temperate", "arid", "maritime", "alpine", "humid", "damp", "mild",
                                        "frozen", "tropical", "scorching")))  # version 2
FACTS = ("name", "kind", "habitat", "diet", "country")
ATTRIBUTES = ("colour", "shape", "pattern")
QUESTIONS = {
    "name": ("what is the name of this creature ?", "what is this creature called ?",
             "who is shown in the picture ?"),
    "kind": ("what kind of creature is this ?", "what type of creature is shown here ?",
             "which species does this creature belong to ?"),
    "habitat": ("where does this creature live ?", "what is the habitat of this creature ?",
                "in which place can this creature be found ?"),
    "diet": ("what does this creature eat ?", "what is the diet of this creature ?",
             "what food does this creature like ?"),
    "country": ("which country is this creature from ?", "where does this creature come from ?",
                "what is the home country of this creature ?"),
    "colour": ("what colour is this creature ?", "what is the colour of the creature ?",
               "which colour does this creature have ?"),
    "shape": ("what shape is this creature ?", "what is the shape of the creature ?",
              "which shape does this creature have ?"),
    "pattern": ("what pattern does this creature have ?", "what is the pattern on the creature ?",
                "which pattern is drawn on this creature ?"),
}
CAPTION_PROMPTS = ("describe the image .", "write a caption for this picture .", "what does this image show ?",
                   "give a short description of the picture .")
TEXT_QUESTIONS = {  # text-only facts: no image
    "capital": ("what is the capital of {} ?", "which city is the capital of {} ?", "name the capital city of {} ."),
    "diet_by_name": ("what does {} eat ?", "what is the diet of {} ?", "what food does {} like ?"),
}
TEXT_QUESTIONS_V2 = {**TEXT_QUESTIONS, "climate": ("what is the climate of the {} ?", "how is the weather in the {} ?",
                                                   "which climate does the {} have ?")}
HOPS = {"country": CAPITALS, "habitat": CLIMATES}  # version 2's two-hop facts: a fact's value -> its text fact
TWO_HOP_QUESTIONS = {  # "the capital of this creature's country": after an edit of the country, the new one's
    "country": ("what is the capital of the home country of this creature ?",
                "which city is the capital of the country this creature comes from ?",
                "name the capital city of the country where this creature is from ."),
    "habitat": ("what is the climate where this creature lives ?",
                "how is the weather in the habitat of this creature ?",
                "what is the climate of the place where this creature lives ?"),
}


@dataclass(frozen=True)
class Version:
    """What differs between world versions."""

    n_entities: int  # the default number of entities
    colours: tuple[str, ...]  # colour answers: "red", or two-tone "red and blue"
    text_questions: dict  # text-only relation -> paraphrases
    two_hop: tuple[str, ...]  # facts with a two-hop (portability) question


VERSIONS = {1: Version(100, tuple(COLOURS), TEXT_QUESTIONS, ()),
            2: Version(512, tuple(COLOURS) + TWO_TONES, TEXT_QUESTIONS_V2, tuple(HOPS))}
