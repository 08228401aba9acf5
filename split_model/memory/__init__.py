"""The frozen memory side: backbones, their tokenizers, and the on-disk state cache."""

from split_model.memory.backbone import (PACKAGED, EncodeDtype, HFMemory, MemoryStates, cache_root, encode_dtype,
                                         pad_batch)
from split_model.memory.cache import CachedStates, MemoryCache, token_batches
from split_model.memory.tokenizer import ByteTokenizer, HFTokenizer, TextTokenizer

__all__ = ["PACKAGED", "EncodeDtype", "HFMemory", "MemoryStates", "cache_root", "encode_dtype", "pad_batch",
           "CachedStates", "MemoryCache", "token_batches", "ByteTokenizer", "HFTokenizer", "TextTokenizer"]
