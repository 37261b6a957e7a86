"""Backbones and tokenizers: any Hugging Face causal LM, plus random-init presets.

Presets build the same architectures (GPT-2, Qwen-3) with random weights so that every code path
is the one a pretrained model takes. Special tokens are added, and embeddings resized, in one
place: `add_special_tokens`.
"""

from __future__ import annotations

import difflib
import json
import os
import socket
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2TokenizerFast,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)
from transformers.utils import cached_file

from latentlab.errors import ModelError
from latentlab.lm_head import compile_head_loss
from latentlab.model_config import ModelConfig
from latentlab.paths import resolve_path
from latentlab.token_shift import (
    add_token_shift,
    decoder_layers,
    load_token_shift,
    quiet_shift_report,
    shift_width,
)


@dataclass(frozen=True)
class Preset:
    model_type: str
    fields: dict[str, Any] = field(default_factory=dict)


# Shapes follow the published configs (GPT-2 small: 124M; Qwen3-0.6B: 28 layers, GQA 16/8).
PRESETS: dict[str, Preset] = {
    "gpt2-tiny": Preset("gpt2", {"n_layer": 2, "n_embd": 128, "n_head": 4, "n_positions": 512}),
    "gpt2-mini": Preset("gpt2", {"n_layer": 4, "n_embd": 256, "n_head": 4, "n_positions": 1024}),
    "gpt2-small": Preset("gpt2", {"n_layer": 12, "n_embd": 768, "n_head": 12,
                                  "n_positions": 1024}),
    # GPT-2 small's depth at half its width (21M parameters besides the embeddings): the
    # from-scratch task recipes (depth for multi-hop search; a quarter of the compute per token,
    # so four times the examples in the same minutes).
    "gpt2-12x384": Preset("gpt2", {"n_layer": 12, "n_embd": 384, "n_head": 6,
                                   "n_positions": 1024}),
    "qwen3-tiny": Preset("qwen3", {"hidden_size": 128, "num_hidden_layers": 2,
                                   "num_attention_heads": 4, "num_key_value_heads": 2,
                                   "head_dim": 32, "intermediate_size": 384,
                                   "max_position_embeddings": 1024, "tie_word_embeddings": True}),
    # gpt2-12x384's size with Qwen-3's blocks (rotary positions, RMSNorm, SwiGLU): relative
    # positions make "the token three back" one attention pattern at every position.
    "qwen3-12x384": Preset("qwen3", {"hidden_size": 384, "num_hidden_layers": 12,
                                     "num_attention_heads": 6, "num_key_value_heads": 6,
                                     "head_dim": 64, "intermediate_size": 1024,
                                     "max_position_embeddings": 1024,
                                     "tie_word_embeddings": True}),
    "qwen3-0.6b": Preset("qwen3", {"hidden_size": 1024, "num_hidden_layers": 28,
                                   "num_attention_heads": 16, "num_key_value_heads": 8,
                                   "head_dim": 128, "intermediate_size": 3072,
                                   "max_position_embeddings": 40960, "rms_norm_eps": 1e-6,
                                   "rope_parameters": {"rope_type": "default",
                                                       "rope_theta": 1_000_000.0},
                                   "tie_word_embeddings": True}),
}


EOS = "<|endoftext|>"
PAD = "<|pad|>"
# What `from_pretrained` raises on missing, damaged or mismatched files.
LOAD_ERRORS = (OSError, ValueError, RuntimeError, SafetensorError)


def build_tokenizer(config: ModelConfig, training_texts: Iterable[str]) -> PreTrainedTokenizerBase:
    """The tokenizer a run uses; `training_texts` is read only when one is trained."""
    choice = config.tokenizer
    if choice == "auto":
        choice = "train" if config.name in PRESETS else config.name
    if choice == "train":
        tokenizer = train_tokenizer(training_texts, config.tokenizer_vocab_size)
    elif choice == "gpt2-bpe":
        files = resolve_path("${LATENTLAB_SHARED}/data/gpt2_tokenizer")
        if not (files / "encoder.json").is_file():
            raise ModelError(f"GPT-2's BPE files are not in {files}",
                             fix="set LATENTLAB_SHARED to the folder holding data/gpt2_tokenizer")
        vocab = json.loads((files / "encoder.json").read_text(encoding="utf-8"))
        lines = (files / "vocab.bpe").read_text(encoding="utf-8").splitlines()[1:]  # 1: version
        tokenizer = GPT2TokenizerFast(vocab=vocab,
                                      merges=[tuple(m.split(" ")) for m in lines if m])
    else:
        tokenizer = _from_pretrained(AutoTokenizer, choice, "tokenizer")
    if tokenizer.eos_token is None:
        tokenizer.add_special_tokens({"eos_token": EOS})
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD})
    return tokenizer


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on the task's text: offline, lossless on any input.

    Digits are split one by one (arithmetic tasks learn far faster when a number's tokens do not
    depend on its neighbours), and byte-level fallback makes every string round-trip.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD)


def build_backbone(config: ModelConfig, tokenizer: PreTrainedTokenizerBase,
                   seed: int) -> PreTrainedModel:
    """A preset with random weights (seeded), or a pretrained model from a hub id / directory."""
    if config.name in PRESETS:
        preset = PRESETS[config.name]
        fields = {**preset.fields, **config.preset_overrides}
        try:
            hf_config = AutoConfig.for_model(
                preset.model_type, vocab_size=len(tokenizer), **fields,
                bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
        except (TypeError, ValueError) as exc:
            raise ModelError(f"model.preset_overrides do not fit {config.name}: {exc}",
                             fix="use field names of the model's Hugging Face config") from None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(
                hf_config, attn_implementation=config.attn_implementation)
    elif config.preset_overrides:
        raise ModelError(f"model.preset_overrides only apply to presets, not {config.name!r}",
                         fix="remove model.preset_overrides")
    else:
        model = _from_pretrained(AutoModelForCausalLM, config.name, "model",
                                 attn_implementation=config.attn_implementation)
    if config.token_shift:
        add_token_shift(model, config.token_shift)
    return model


def _from_pretrained(cls: Any, name: str, what: str, **kwargs: Any) -> Any:
    local = resolve_path(name)
    if local.exists():
        try:
            return _load(cls, str(local), **kwargs)
        except LOAD_ERRORS as exc:
            raise _damaged(local, what, exc) from None
    if local.is_absolute() or name.startswith((".", "~")):  # a path, not a hub id
        raise ModelError(f"cannot load the {what} {name!r}: directory {local} does not exist",
                         fix="check the path, or use a preset or a hub id")
    presets = ", ".join(PRESETS)
    close = difflib.get_close_matches(name, PRESETS, n=1)
    fix = (f"did you mean the preset {close[0]}? Otherwise use " if close else "use ") + (
        f"a preset ({presets}), a local directory, or a hub id with network access")
    try:  # the Hugging Face cache first: no network needed, none waited for
        return _load(cls, name, local_files_only=True, **kwargs)
    except LOAD_ERRORS:
        pass
    if not _hub_reachable():
        raise ModelError(f"cannot load the {what} {name!r}: it is not a preset, a local "
                         "directory or in the Hugging Face cache, and the hub cannot be "
                         "reached (offline)", fix=fix)
    try:
        return _load(cls, name, **kwargs)
    except LOAD_ERRORS as exc:
        raise ModelError(f"cannot load the {what} {name!r} ({str(exc).splitlines()[0]})",
                         fix=fix) from None


def _load(cls: Any, source: str, **kwargs: Any) -> Any:
    """`cls.from_pretrained(source)`; a model gets back the token shift its config names
    (`load_token_shift`), read from the directory its files are in (a local one, or the hub
    cache's copy)."""
    with quiet_shift_report():
        loaded = cls.from_pretrained(source, **kwargs)
    if isinstance(loaded, PreTrainedModel) and shift_width(loaded.config):
        load_token_shift(loaded, Path(cached_file(source, "config.json")).parent)
    return loaded


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection within `timeout` seconds:
    offline, `from_pretrained` retries for a minute before it fails."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return False
    host = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((host.hostname or "huggingface.co", host.port or 443),
                                      timeout=timeout):
            return True
    except OSError:
        return False


def check_tokenizer_matches(config: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> None:
    """A pretrained model directory that holds its own tokenizer, paired with another one
    (model.tokenizer): the vocabularies must be the same, or token ids mean other words."""
    model_dir = resolve_path(config.name)
    if config.tokenizer in ("auto", "train", "gpt2-bpe") or not model_dir.is_dir():
        return
    if not any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return
    own = _from_pretrained(AutoTokenizer, str(model_dir), "tokenizer")
    if own.get_vocab() != tokenizer.get_vocab():
        raise ModelError(f"model.tokenizer={config.tokenizer} is not the tokenizer saved with "
                         f"the model {model_dir}: their vocabularies differ",
                         fix="set model.tokenizer=auto (the model's own tokenizer)")


def add_special_tokens(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel,
                       tokens: Iterable[str]) -> list[str]:
    """Register method tokens (e.g. `<pause>`, `<bot>`) and grow the embeddings to fit; returns
    the tokens that were new (a saved run's tokenizer already has them).

    The one place the vocabulary changes. A tokenizer larger than the model's embedding table
    before any token is added belongs to another model, which is an error, not a resize.
    """
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ModelError(f"the tokenizer has {len(tokenizer)} tokens but the model only "
                         f"{rows} embeddings: they do not belong together",
                         fix="use the model's own tokenizer (model.tokenizer=auto)")
    new = [t for t in tokens if t not in tokenizer.get_vocab()]
    if new:
        tokenizer.add_special_tokens({"extra_special_tokens": new},
                                     replace_extra_special_tokens=False)
    if len(tokenizer) > rows:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    return new


def load_pretrained_dir(path: Path, attn_implementation: str = "sdpa"
                        ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A backbone and its tokenizer saved by `save_pretrained` (a run's `best/model`)."""
    if not (path / "config.json").is_file():
        raise ModelError(f"{path} holds no saved model",
                         fix="point at a finished run directory (it has best/model)")
    try:
        model = _load(AutoModelForCausalLM, str(path), attn_implementation=attn_implementation)
    except LOAD_ERRORS as exc:
        raise _damaged(path, "model", exc) from None
    return model, load_saved_tokenizer(path)


def load_saved_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    """A tokenizer written by `save_pretrained` (a run's `tokenizer/` or `best/model`)."""
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except LOAD_ERRORS as exc:
        raise _damaged(path, "tokenizer", exc) from None


def _damaged(path: Path, what: str, exc: Exception) -> ModelError:
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ModelError(f"cannot load the {what} saved in {path} ({detail})",
                      fix="its files are damaged or incomplete: restore or re-create them")


RECOMPILE_LIMIT = 64  # graphs per compiled body (see compile_transformers)


def compile_transformers(module: torch.nn.Module,
                         scope: Literal["body", "layers"] = "body") -> None:
    """`torch.compile` the transformer body (`base_model`) of every Hugging Face model inside
    `module` (a method's Base, its coprocessor), in place: state-dict keys stay the same. With
    `scope` 'layers', each decoder layer instead (regional compilation, `model.compile_scope`):
    one compiled code serves every layer, so compiling takes a fraction of the time.

    Dynamic shapes from the start, because every method calls the body with many lengths (a
    prefix, single thought or decode columns over a growing cache, padded and unpadded masks);
    compiled for one shape first, it would recompile for each until dynamo's recompile limit.
    """
    models = {id(m.base_model): m for m in module.modules() if isinstance(m, PreTrainedModel)}
    # One body serves a fixed but larger set of call forms than dynamo's default limit of 8
    # graphs: prefix, single-column and multi-column passes, over a cache or not, ids or
    # embeddings, a 2-D or 4-D mask, with and without grad (training, validation, decoding).
    # Past the limit dynamo falls back to eager for every new form, silently slow. Compiled
    # layers share one code, and a pass over a cache compiles for each layer (its index in
    # the cache is a constant of the graph): the limit grows with the layers.
    if scope == "layers":
        targets = [layer for m in models.values()
                   for layer in decoder_layers(m, "model.compile_scope=body")]
        limit = RECOMPILE_LIMIT * len(targets)  # layers of one class share their code
    else:
        targets, limit = [m.base_model for m in models.values()], RECOMPILE_LIMIT
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
    for target in targets:
        target.compile(dynamic=True)
    for model in module.modules():  # the LM head's model, not only its body's
        if isinstance(model, PreTrainedModel):
            compile_head_loss(model)


def count_parameters(module: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
