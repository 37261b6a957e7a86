"""The KV-cache Coprocessor (Liu et al., paper B) and the two variants of paper A (H1, H2).

Per example, at the augmentation point `p` (the end of the question):
1. the Base `B_θ` reads `x_{≤p}` into its KV cache;
2. the Coprocessor `C_φ` (the Base's architecture, initialised from its weights by default)
   reads that cache plus `N_L` trainable soft tokens in ONE forward pass at positions
   `p+1..p+N_L`; its last-layer states there are the latents `Z` (`N_L x d`);
3. injection, then the Base decodes what follows:
   - `liu`: `Z` enters the Base as input embeddings after `x_{≤p}`; the Base computes its own
     keys and values for them. Base frozen.
   - `h1`: the Coprocessor's own per-layer keys and values at the `N_L` positions stay in the
     cache after the Base's (`K_l <- [K_l(x; θ); K_l^φ]`), at every layer. Base frozen.
   - `h2`: Base and Coprocessor trained jointly, `injection: embeddings | kv`.

The cache makes the implementation short: the Coprocessor's pass runs on top of the Base's
cache and appends its own keys/values to it. For `kv` injection that appended cache is exactly
`[K(x; θ); K^φ]`; for `embeddings` injection it is cropped back to the Base's part.

Choice (the papers are silent): with `kv` injection the Base has no query at the latent
positions, so it re-reads the last prompt token after them (position `p+N_L+1`); that position
predicts the first token after the latents. Its rotary position comes from the attention mask,
so Qwen-3's keys from the Coprocessor (rotated for `p+1..p+N_L`) and the Base's continuation
stay consistent.
"""

from __future__ import annotations

import copy
import random
import zlib
from typing import TYPE_CHECKING, Any, Literal, TypedDict

import torch
from pydantic import Field
from torch import Tensor, nn
from transformers import DynamicCache

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

from latentlab.engine.generation import (
    DecodeState,
    attention_bias,
    extend,
    left_pad,
    output_cache,
    position_ids,
    prefill,
    with_cache,
)
from latentlab.errors import ConfigError
from latentlab.latents import with_orthogonality
from latentlab.methods.base import (
    Features,
    LatentConfig,
    Method,
    StepOutput,
    TokenBatch,
    part_fields,
    part_id,
    part_lm_loss,
)
from latentlab.tasks.base import Example
from latentlab.token_shift import add_token_shift, shift_width


class CoprocessorBatch(TokenBatch, total=False):
    """A reasoning batch (`Coprocessor.collate`): prompts left-padded, so that every row's
    augmentation point is the last prompt column; `labels` and `parts` span one column more
    than `target_ids` (the injection's last column, which predicts the first target)."""

    prompt_ids: Tensor  # [B, P]
    prompt_mask: Tensor  # [B, P], 1 on real tokens
    target_ids: Tensor  # [B, T]: steps (when kept) and answer, right-padded


class TextWindowBatch(TypedDict):
    """A pretraining batch: full text windows and the augmentation points of each."""

    text_ids: Tensor  # [B, T]
    points: Tensor  # [B, M]: sorted positions after which latents are inserted
    num_tokens: int


class CoprocessorConfig(LatentConfig):
    coprocessor_init: Literal["base", "random"] = Field(
        "base", description="start the Coprocessor from the Base's weights (B's default) or "
        "from random weights of the same architecture (B, Table 7)")
    # Text pretraining (paper B's recipe; used when the task is `text`).
    augmentation_points: int = Field(16, ge=1, description="M: augmentation points per "
                                     "training sequence (B: 128 per 2048 tokens)")
    ahead_tokens: int = Field(16, ge=1, description="N_A: tokens after each point that carry "
                              "the loss (B: 16)")
    trace_packing: bool = Field(True, description="all M traces of a sequence in one pass per "
                                "module with a trace attention mask (B); false: one pass per "
                                "trace (A)")


class LiuConfig(CoprocessorConfig):
    name: Literal["liu"] = "liu"
    injection: Literal["embeddings"] = "embeddings"
    train_base: Literal[False] = False


class H1Config(CoprocessorConfig):
    name: Literal["h1"] = "h1"
    injection: Literal["kv"] = "kv"
    train_base: Literal[False] = False


class H2Config(CoprocessorConfig):
    name: Literal["h2"] = "h2"
    injection: Literal["embeddings", "kv"] = Field(
        "embeddings", description="how the latents reach the Base (paper A: Liu-style by "
        "default, H1-style as an option)")
    train_base: Literal[True] = True


AnyCoprocessorConfig = LiuConfig | H1Config | H2Config


class Coprocessor(Method):
    """Base + Coprocessor; `liu`, `h1` and `h2` are this class with different configs."""

    config: AnyCoprocessorConfig

    def __init__(self, config: AnyCoprocessorConfig, backbone: PreTrainedModel,
                 tokenizer: PreTrainedTokenizerBase) -> None:
        super().__init__(config, backbone, tokenizer)
        if config.coprocessor_init == "base":
            self.coprocessor = copy.deepcopy(backbone)
        else:
            from transformers import AutoModelForCausalLM  # slow to import: config loads fast

            self.coprocessor = AutoModelForCausalLM.from_config(
                backbone.config, attn_implementation=backbone.config._attn_implementation)
            if shift := shift_width(backbone.config):  # the Base's architecture
                add_token_shift(self.coprocessor, shift)
        # The Coprocessor reads soft tokens and a cache, never token ids, and its LM head is
        # never used: freezing them keeps them out of the optimizer (and out of DDP's
        # unused-parameter check).
        self.coprocessor.get_input_embeddings().requires_grad_(False)
        self.coprocessor.get_output_embeddings().requires_grad_(False)
        self.backbone.requires_grad_(config.train_base)
        table = backbone.get_input_embeddings().weight
        self.soft_tokens = nn.Parameter(
            torch.randn(config.latent_budget, table.shape[1]) * table.detach().std())

    def train(self, mode: bool = True) -> Coprocessor:
        super().train(mode)
        if not self.config.train_base:
            self.backbone.eval()  # a frozen Base is a fixed function: no dropout
        return self

    # -- data ------------------------------------------------------------------------------
    def encode(self, example: Example) -> Features:
        pieces = self.target_pieces(example, self.config.keep_steps)
        return {"prompt_ids": self.prompt_ids(example),
                "target_ids": [i for ids, _ in pieces for i in ids],
                "target_parts": [part_id(part) for ids, part in pieces for _ in ids]}

    def encode_text(self, ids: list[int]) -> Features:
        """A pretraining window and its M augmentation points (distinct, sorted, each with
        N_A tokens after it), drawn from a hash of the window so that every epoch and every
        resumed run sees the same points."""
        if shift := shift_width(self.backbone.config):
            raise ConfigError(f"text pretraining with a token-shifted Base (model.token_shift="
                              f"{shift}) is not supported: its traces sit after the whole "
                              "window, not after their augmentation points, so the shift "
                              "would mix in the wrong neighbours",
                              fix="pretrain a Base without model.token_shift")
        room = len(ids) - self.config.ahead_tokens
        if room < self.config.augmentation_points:
            raise ConfigError(f"task.seq_len={len(ids)} leaves room for fewer than "
                              f"method.augmentation_points={self.config.augmentation_points}",
                              fix="raise task.seq_len or lower augmentation_points/ahead_tokens")
        # The latents and the ahead tokens after a point take positions up to
        # len(ids) + N_L - 1; a learned position table (GPT-2) has no rows beyond its size.
        needed = len(ids) + self.config.latent_budget
        limit = getattr(self.backbone.config, "max_position_embeddings", None)
        if limit is not None and needed > limit:
            raise ConfigError(f"task.seq_len={len(ids)} plus method.latent_budget="
                              f"{self.config.latent_budget} latents needs {needed} positions, "
                              f"but the model has {limit}",
                              fix=f"lower task.seq_len to {limit - self.config.latent_budget}")
        rng = random.Random(zlib.crc32(bytes(str(ids), "ascii")))
        return {"text_ids": ids,
                "points": sorted(rng.sample(range(room), self.config.augmentation_points))}

    def feature_length(self, features: Features) -> int:
        if "text_ids" in features:  # a pretraining window
            return len(features["text_ids"])
        return len(features["prompt_ids"]) + len(features["target_ids"])

    def collate(self, features: list[Features]) -> CoprocessorBatch | TextWindowBatch:
        """Prompts left-padded (every augmentation point in the same column), targets
        right-padded after the latents; text windows stacked as they are."""
        if "text_ids" in features[0]:
            ids = torch.tensor([f["text_ids"] for f in features])
            return TextWindowBatch(text_ids=ids, num_tokens=ids.numel(),
                                   points=torch.tensor([f["points"] for f in features]))
        prompt, prompt_mask = left_pad([f["prompt_ids"] for f in features],
                                       self.tokenizer.pad_token_id)
        targets = [{"input_ids": f["target_ids"], "labels": f["target_ids"],
                    "parts": f["target_parts"]} for f in features]
        # Targets right-padded after a leading column with no label: the injection's last
        # column, which predicts the first target token (`forward` puts the injection's other
        # columns before it).
        width = 1 + max(len(t["input_ids"]) for t in targets)
        rows = self.collate_rows(targets, [[i] for i in range(len(targets))], width,
                                 offsets=[1] * len(targets))
        n_tokens = (int(prompt_mask.sum()) + rows["num_tokens"]
                    + self.config.latent_budget * len(features))
        return CoprocessorBatch(prompt_ids=prompt, prompt_mask=prompt_mask,
                                target_ids=rows["input_ids"][:, 1:], labels=rows["labels"],
                                num_tokens=n_tokens, **part_fields(rows["labels"], rows["parts"]))

    # -- the three passes --------------------------------------------------------------------
    def read_prompt(self, prompt_ids: Tensor, prompt_mask: Tensor) -> DecodeState:
        """Pass 1: the Base's cache of the (left-padded) prompts."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.config.train_base):
            return prefill(self.backbone, prompt_mask, input_ids=prompt_ids)

    def soft_rows(self, batch: int) -> Tensor:
        """The soft tokens for every row, [B, N_L, d]: a copy, not an expanded view, because
        a view of a parameter made under no_grad requires grad without a grad_fn, which
        PyTorch's module tracker (FlopCounterMode, `recipes.compute`) cannot hook."""
        return self.soft_tokens.unsqueeze(0).repeat(batch, 1, 1)

    def augment(self, state: DecodeState) -> tuple[DecodeState, Tensor]:
        """Pass 2: the Coprocessor reads the Base's cache and the soft tokens in one forward.

        Returns the state the Base continues from, and the latents `Z` [B, N_L, d].
        """
        batch, n = state.attention_mask.shape[0], self.config.latent_budget
        soft = self.soft_rows(batch)
        ones = state.attention_mask.new_ones((batch, n))
        augmented = extend(self.coprocessor, state, ones, inputs_embeds=soft)
        latents = augmented.hidden
        if self.config.injection == "kv":
            return augmented, latents  # the cache now holds [K(x; θ); K^φ] at every layer
        # Keep the Base's own keys only; Z enters as embeddings. (A negative count means "drop
        # that many" in every transformers version; positive meanings differ between them.)
        augmented.cache.crop(-n)
        return DecodeState(augmented.cache, state.attention_mask, state.logits,
                           state.hidden), latents

    def inject(self, state: DecodeState, latents: Tensor, prompt_ids: Tensor,
               suffix_ids: Tensor | None = None) -> tuple[DecodeState, int]:
        """Pass 3: the Base reads the injection (and `suffix_ids`, if given) on top of the
        cache. Returns the new state and how many leading positions carry no label."""
        batch = latents.shape[0]
        # kv: re-read the last prompt token (see the module docstring); embeddings: Z itself
        head = self.embed(prompt_ids[:, -1:]) if self.config.injection == "kv" else latents
        embeds = head if suffix_ids is None else torch.cat([head, self.embed(suffix_ids)], 1)
        # Pads of right-padded targets come after every real token: the causal mask suffices.
        ones = state.attention_mask.new_ones((batch, embeds.shape[1]))
        return extend(self.backbone, state, ones, inputs_embeds=embeds), head.shape[1]

    def forward(self, batch: CoprocessorBatch | TextWindowBatch) -> StepOutput:
        if "text_ids" in batch:
            return self.pretrain_forward(batch)
        state = self.read_prompt(batch["prompt_ids"], batch["prompt_mask"])
        state, latents = self.augment(state)
        state, n_head = self.inject(state, latents, batch["prompt_ids"], batch["target_ids"])
        loss, metrics = part_lm_loss(self.backbone, state.hidden, batch, offset=n_head - 1)
        metrics["lm_loss"] = loss.detach()
        return StepOutput(with_orthogonality(loss, metrics, latents, self.config.orthogonality),
                          metrics)

    # -- text pretraining (paper B) ------------------------------------------------------------
    def pretrain_forward(self, batch: TextWindowBatch) -> StepOutput:
        nll, latents = self.ahead_nll(batch["text_ids"], batch["points"])
        loss = nll.mean()
        metrics = {"lm_loss": loss.detach()}
        return StepOutput(with_orthogonality(loss, metrics, latents.flatten(0, 1),
                                             self.config.orthogonality), metrics)

    def text_nll(self, batch: TextWindowBatch) -> dict[str, Tensor]:
        """NLL of the k-th token after the latents [B, M, N_A], and the Base's own NLL of the
        same tokens without latents (B, Table 1 reports the relative change)."""
        text, points = batch["text_ids"], batch["points"]
        nll, _ = self.ahead_nll(text, points)
        logits = self.backbone(input_ids=text).logits.float()
        steps = torch.arange(self.config.ahead_tokens, device=text.device)
        where = (points[:, :, None] + steps).flatten(1)  # the position predicting each token
        chosen = logits.gather(1, where[..., None].expand(-1, -1, logits.shape[-1]))
        base = torch.nn.functional.cross_entropy(chosen.transpose(1, 2),
                                                 text.gather(1, where + 1), reduction="none")
        return {"nll": nll, "base_nll": base.view(nll.shape)}

    def ahead_nll(self, text: Tensor, points: Tensor) -> tuple[Tensor, Tensor]:
        """NLL of the N_A tokens after each augmentation point, given the latents:
        [B, M, N_A] (k-th column: the k-th token after the latents), and the latents
        [B, M, N_L, d]."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.config.train_base):
            base = self.backbone.base_model
            cache = output_cache(base(input_ids=text, use_cache=True, **with_cache(
                base, DynamicCache(config=self.backbone.config))))
        run = self._packed_traces if self.config.trace_packing else self._separate_traces
        states, latents = run(cache, text, points)
        steps = torch.arange(1, self.config.ahead_tokens + 1, device=text.device)
        targets = text.gather(1, (points[:, :, None] + steps).flatten(1)).view(states.shape[:3])
        logits = self.backbone.get_output_embeddings()(states).float()
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 2), targets.flatten(),
                                                reduction="none").view(targets.shape)
        return nll, latents

    def _trace_inputs(self, text: Tensor, points: Tensor, latents: Tensor) -> Tensor:
        """The Base's inputs of each trace: [Z, x_{p+1}..x_{p+N_A-1}] (embeddings injection)
        or [x_p, x_{p+1}..x_{p+N_A-1}] (kv: the re-read token first). [B, M, length, d]."""
        batch, m = points.shape
        ahead = self.config.ahead_tokens
        first = 0 if self.config.injection == "kv" else 1
        offsets = torch.arange(first, ahead, device=text.device)
        ids = text.gather(1, (points[:, :, None] + offsets).flatten(1)).view(batch, m, -1)
        embeds = self.embed(ids)
        return embeds if self.config.injection == "kv" else torch.cat([latents, embeds], 2)

    def _separate_traces(self, cache: Any, text: Tensor,
                         points: Tensor) -> tuple[Tensor, Tensor]:
        """One Coprocessor pass and one Base pass per trace (paper A's way). Each pass sees the
        sequence up to its point through a 2-D mask over the shared cache, appends its own
        keys and values, and crops them off again afterwards."""
        batch, length = text.shape
        n, ahead = self.config.latent_budget, self.config.ahead_tokens
        keys = torch.arange(length, device=text.device)
        soft = self.soft_rows(batch)
        states, all_latents = [], []
        for m in range(points.shape[1]):
            seen = (keys[None] <= points[:, m, None]).long()  # x_{<=p} of each row
            mask = torch.cat([seen, seen.new_ones((batch, n))], 1)
            latents = self.coprocessor.base_model(
                inputs_embeds=soft, attention_mask=mask, position_ids=position_ids(mask, n),
                **with_cache(self.coprocessor.base_model, cache),
                use_cache=True).last_hidden_state
            if self.config.injection == "embeddings":
                cache.crop(-n)
                mask = seen
            inputs = self._trace_inputs(text, points[:, m:m + 1], latents[:, None])[:, 0]
            mask = torch.cat([mask, mask.new_ones((batch, inputs.shape[1]))], 1)
            hidden = self.backbone.base_model(
                inputs_embeds=inputs, attention_mask=mask,
                position_ids=position_ids(mask, inputs.shape[1]),
                **with_cache(self.backbone.base_model, cache),
                use_cache=True).last_hidden_state
            cache.crop(-(inputs.shape[1] + (n if self.config.injection == "kv" else 0)))
            states.append(hidden[:, -ahead:])
            all_latents.append(latents)
        return torch.stack(states, 1), torch.stack(all_latents, 1)

    def _packed_traces(self, cache: Any, text: Tensor, points: Tensor) -> tuple[Tensor, Tensor]:
        """All M traces in one Coprocessor pass and one Base pass (paper B's packing): each
        trace is a block after the sequence that sees x_{<=p} and, causally, its own block
        (and, for kv injection, its own Coprocessor keys), nothing of other traces."""
        batch, length = text.shape
        m = points.shape[1]
        n, ahead = self.config.latent_budget, self.config.ahead_tokens
        device = text.device
        soft = self.soft_tokens.repeat(m, 1).unsqueeze(0).expand(batch, -1, -1)
        sees_text = torch.arange(length, device=device)[None, None] <= points[:, :, None]

        def block_mask(width: int, prefix: list[Tensor]) -> Tensor:
            """[B, 1, M*width, keys]: queries of trace i see `prefix` parts and their own
            block causally."""
            own = torch.block_diag(*[torch.ones(width, width, dtype=torch.bool,
                                                device=device).tril()] * m)
            parts = [p.repeat_interleave(width, dim=1) for p in prefix]
            return torch.cat([*parts, own.expand(batch, -1, -1)], 2)[:, None]

        def positions(start: int, width: int) -> Tensor:
            return (points[:, :, None] + 1 + start
                    + torch.arange(width, device=device)).flatten(1)

        mask = attention_bias(self.backbone, block_mask(n, [sees_text]))
        latents = self.coprocessor.base_model(
            inputs_embeds=soft, attention_mask=mask, position_ids=positions(0, n),
            **with_cache(self.coprocessor.base_model, cache),
            use_cache=True).last_hidden_state.view(batch, m, n, -1)
        inputs = self._trace_inputs(text, points, latents)
        width = inputs.shape[2]
        if self.config.injection == "kv":
            own_latents = torch.eye(m, dtype=torch.bool, device=device).repeat_interleave(n, 1)
            prefix = [sees_text, own_latents[None].expand(batch, -1, -1)]
            start = n
        else:
            cache.crop(-m * n)
            prefix, start = [sees_text], 0
        hidden = self.backbone.base_model(
            inputs_embeds=inputs.flatten(1, 2),
            attention_mask=attention_bias(self.backbone, block_mask(width, prefix)),
            position_ids=positions(start, width),
            **with_cache(self.backbone.base_model, cache),
            use_cache=True).last_hidden_state
        return hidden.view(batch, m, width, -1)[:, :, -ahead:], latents

    # -- inference -------------------------------------------------------------------------
    @torch.no_grad()
    def before_answer(self, examples: list[Example],
                      latent_inputs: Tensor | None = None) -> DecodeState:
        """The Coprocessor runs once at the end of the prompt; its latents are injected (or
        `latent_inputs` in their place)."""
        ids, mask = left_pad([self.prompt_ids(e) for e in examples],
                             self.tokenizer.pad_token_id, self.device)
        state, latents = self.augment(self.read_prompt(ids, mask))
        if latent_inputs is not None:
            if self.config.injection == "kv":
                self._coprocessor_kv(state, latent_inputs.to(latents.dtype))
            else:
                latents = latent_inputs.to(latents.dtype)
        return self.inject(state, latents, ids)[0]

    @torch.no_grad()
    def latent_inputs(self, examples: list[Example]) -> Tensor:
        """What enters the Base: `Z` [n, N_L, d] (embedding injection), or the Coprocessor's
        keys and values at its N_L positions, every layer [n, layers, 2, heads, N_L, d_head]
        (KV injection)."""
        ids, mask = left_pad([self.prompt_ids(e) for e in examples],
                             self.tokenizer.pad_token_id, self.device)
        state, latents = self.augment(self.read_prompt(ids, mask))
        return self._coprocessor_kv(state) if self.config.injection == "kv" else latents

    def _coprocessor_kv(self, state: DecodeState, replace: Tensor | None = None) -> Tensor:
        """The cache's last N_L columns (the Coprocessor's keys and values) at every layer,
        after writing `replace` into them if given."""
        n = self.config.latent_budget
        layers = state.cache.layers
        if replace is not None:
            for i, layer in enumerate(layers):
                layer.keys[..., -n:, :] = replace[:, i, 0]
                layer.values[..., -n:, :] = replace[:, i, 1]
        return torch.stack([torch.stack([layer.keys[..., -n:, :], layer.values[..., -n:, :]])
                            for layer in layers]).permute(2, 0, 1, 3, 4, 5)

    @torch.no_grad()
    def latents(self, examples: list[Example]) -> Tensor:
        """The latents `Z` per example and slot: [n, N_L, d] (the Coprocessor's last layer)."""
        ids, mask = left_pad([self.prompt_ids(e) for e in examples],
                             self.tokenizer.pad_token_id, self.device)
        return self.augment(self.read_prompt(ids, mask))[1]


class Liu(Coprocessor):
    name = "liu"
    config_class = LiuConfig


class H1(Coprocessor):
    name = "h1"
    config_class = H1Config


class H2(Coprocessor):
    name = "h2"
    config_class = H2Config

