"""The demo world (`python -m stages.world`): seeded invented facts, and the datasets and models built from them.

facts: the world (people and cities with facts); text: its sentences, passages and questions; demo_data: the
datasets; model: the presets' tokenizer and model; build: writing a world into DIR/data and DIR/model.
Only the standard library is imported here, so `python -m stages.world --help` is instant.
"""

from .build import build_into, build_world
from .demo_data import DATASET_INFO, build_datasets, world_texts, write_demo_data
from .facts import Entity, Fact, World, generate_world
from .model import PRESETS, ROLE_TOKENS, build_tiny_model, train_tokenizer
from .text import QAPair, make_corpus, make_passages, make_preferences, make_qa, say

__all__ = [
    "DATASET_INFO", "PRESETS", "ROLE_TOKENS", "Entity", "Fact", "QAPair", "World", "build_datasets", "build_into",
    "build_tiny_model", "build_world", "generate_world", "make_corpus", "make_passages", "make_preferences",
    "make_qa", "say", "train_tokenizer", "world_texts", "write_demo_data",
]
