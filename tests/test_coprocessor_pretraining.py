"""Paper B's pretraining recipe: the packed trace-mask pass against separate passes per trace."""

from __future__ import annotations

import pytest
import torch

from latentlab.backbones import ModelConfig, add_special_tokens, build_backbone, train_tokenizer
from latentlab.errors import ConfigError
from latentlab.methods.coprocessor import H1, H2, H1Config, H2Config, Liu, LiuConfig

TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was "
        "the age of foolishness, it was the epoch of belief, it was the epoch of incredulity. ")
VARIANTS = {"liu": (Liu, LiuConfig, {}), "h1": (H1, H1Config, {}),
            "h2": (H2, H2Config, {}), "h2-kv": (H2, H2Config, {"injection": "kv"})}


def make(variant: str, preset: str, packing: bool):
    cls, config_cls, options = VARIANTS[variant]
    tok = train_tokenizer([TEXT] * 10, 300)
    backbone = build_backbone(ModelConfig(name=preset), tok, seed=0)
    config = config_cls(latent_budget=3, augmentation_points=4, ahead_tokens=5,
                        trace_packing=packing, **options)
    add_special_tokens(tok, backbone, cls.special_tokens(config))
    torch.manual_seed(0)
    method = cls(config, backbone, tok).eval()  # eval: no dropout, the two must match exactly
    ids = tok(TEXT * 2, add_special_tokens=False)["input_ids"]
    windows = [ids[:40], ids[7:47]]
    return method, method.collate([method.encode_text(w) for w in windows])


@pytest.mark.parametrize("preset", ["gpt2-tiny", "qwen3-tiny"])
@pytest.mark.parametrize("variant", ["liu", "h1", "h2", "h2-kv"])
def test_packed_and_separate_passes_give_the_same_loss_and_gradients(variant, preset) -> None:
    results = []
    for packing in (True, False):
        method, batch = make(variant, preset, packing)
        loss = method(batch).loss
        loss.backward()
        grads = {k: p.grad.clone() for k, p in method.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads))
    (packed_loss, packed), (separate_loss, separate) = results
    torch.testing.assert_close(packed_loss, separate_loss, rtol=1e-5, atol=1e-6)
    assert packed.keys() == separate.keys() and "soft_tokens" in packed
    assert any(k.startswith("backbone.") for k in packed) == variant.startswith("h2")
    for name in packed:
        torch.testing.assert_close(packed[name], separate[name], rtol=1e-4, atol=1e-6,
                                   msg=name)


@pytest.mark.parametrize("preset", ["gpt2-tiny", "qwen3-tiny"])
def test_ahead_nll_equals_one_trace_computed_from_scratch(preset: str) -> None:
    """Liu with the Coprocessor an exact copy of the Base and soft tokens = embeddings of u:
    the k-th ahead token's NLL equals the Base reading [x_{<=p}, u, x_{p+1..}] from scratch."""
    method, batch = make("liu", preset, packing=True)
    u = [5, 6, 7]
    with torch.no_grad():
        method.soft_tokens.copy_(method.backbone.get_input_embeddings().weight[u])
        nll, latents = method.ahead_nll(batch["text_ids"], batch["points"])
        for row in range(2):
            text = batch["text_ids"][row].tolist()
            for m, p in enumerate(batch["points"][row].tolist()):
                ids = torch.tensor([text[: p + 1] + u])
                z = method.backbone(input_ids=ids, output_hidden_states=True).hidden_states[-1]
                table = method.backbone.get_input_embeddings()
                embeds = torch.cat([table(torch.tensor(text[: p + 1])), z[0, -3:],
                                    table(torch.tensor(text[p + 1: p + 5]))])[None]
                logits = method.backbone(inputs_embeds=embeds).logits[0, p + 3:]
                expected = torch.nn.functional.cross_entropy(
                    logits, torch.tensor(text[p + 1: p + 6]), reduction="none")
                torch.testing.assert_close(nll[row, m], expected, rtol=1e-4, atol=1e-5)
    assert latents.shape == (2, 4, 3, 128)


def test_augmentation_points_are_fixed_per_window_and_leave_room() -> None:
    method, batch = make("h1", "gpt2-tiny", True)
    points = batch["points"]
    assert points.shape == (2, 4) and (points.diff(dim=1) > 0).all()
    assert (points + 5 < 40).all()
    again = method.encode_text(batch["text_ids"][0].tolist())["points"]
    assert again == points[0].tolist()


def test_window_plus_latents_longer_than_the_position_table_is_refused() -> None:
    # gpt2-tiny has 512 learned positions: a 510-token window and 3 latents need 513.
    method, _ = make("liu", "gpt2-tiny", True)
    limit = method.backbone.config.max_position_embeddings
    assert limit == 512
    method.encode_text(list(range(5, 5 + limit - 3)))  # exactly fits
    with pytest.raises(ConfigError, match=r"needs 513 positions.*lower task\.seq_len to 509"):
        method.encode_text(list(range(5, 5 + limit - 2)))
