"""The frozen memory side: backbones, their tokenizers, and the on-disk state cache."""

from split_model.memory.backbone import PACKAGED, HFMemory, MemoryStates, cache_root, pad_batch
from split_model.memory.cache import CachedStates, MemoryCache
from split_model.memory.tokenizer import ByteTokenizer, HFTokenizer, TextTokenizer

__all__ = ["PACKAGED", "HFMemory", "MemoryStates", "cache_root", "pad_batch", "CachedStates", "MemoryCache",
           "ByteTokenizer", "HFTokenizer", "TextTokenizer"]
