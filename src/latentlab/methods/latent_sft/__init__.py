"""Latent-SFT: latent reasoning as a chain of superposition (Deng et al., arXiv 2510.15522;
METHODS.md section 5). docs/methods/latent_sft.md draws the masks and gives the pipeline.

A latent is a convex combination of the decoder's input embeddings, `z = α^T E`. Two phases,
one method name (`method.phase`), each a run of its own and a class of its own:

- `encoder_phase.LatentSFTEncoder` (stage 1): an encoder learns to compress each chunk of the
  CoT into one latent while the decoder learns to read them.
- `latent_phase.LatentSFTLatent` (stage 2): the LM learns to produce the encoder's latents
  itself (`soft_labels`: the encoder's α of every training example, stored once).

Inference (either phase; the decoder is an LM, `method.LatentSFT`): after `<think>` the model's
next-token distribution `q` either says `</think>` (argmax) or becomes the next input `q_k^T E`
(top-k, renormalised), on one KV cache; then the answer is decoded as text. `metrics` holds
the paper's measures (ECR@K, #L, N_eff).
"""

from latentlab.methods.latent_sft.config import COMPRESS, END_THINK, THINK, LatentSFTConfig
from latentlab.methods.latent_sft.encoder_phase import LatentSFTEncoder
from latentlab.methods.latent_sft.latent_phase import LatentSFTLatent
from latentlab.methods.latent_sft.method import LatentSFT

__all__ = ["COMPRESS", "END_THINK", "THINK", "LatentSFT", "LatentSFTConfig", "LatentSFTEncoder",
           "LatentSFTLatent"]
