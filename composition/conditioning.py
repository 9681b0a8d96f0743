"""Text conditioning rows for a denoiser call (prompt embeddings, plus SDXL's/SD3's/FLUX's pooled embeddings and
SDXL's time ids; which keyword arguments they become is the model family's business, `pipelines.families`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


def _cat(parts, name: str, dim: int = 0):
    first = getattr(parts[0], name)
    return None if first is None else torch.cat([getattr(p, name) for p in parts], dim=dim)


@dataclass
class Conditioning:
    """Per-row conditioning; rows line up with the latent rows of the same denoiser call.

    `null` marks rows whose prediction is defined as zero and never computed: a guidance-distilled model (FLUX.1 dev
    and schnell) has no unconditional branch, so the negative row of a method's CFG pair is null there and, with the
    method's guidance scale 1, eps_u + 1 * (eps_c - eps_u) is the conditional prediction exactly."""

    hidden: torch.Tensor  # (B, L, D) encoder hidden states
    pooled: torch.Tensor | None = None  # (B, P) SDXL `text_embeds`, SD3/FLUX `pooled_projections`
    time_ids: torch.Tensor | None = None  # (B, 6) SDXL `time_ids`
    null: torch.Tensor | None = None  # (B,) bool: rows with no prediction (see above); None = none

    def __len__(self) -> int:
        return int(self.hidden.shape[0])

    @staticmethod
    def cat(parts: Sequence[Conditioning]) -> Conditioning:
        nulls = [p.null for p in parts]
        null = None if all(n is None for n in nulls) else torch.cat(
            [torch.zeros(len(p), dtype=torch.bool) if p.null is None else p.null for p in parts])
        return Conditioning(_cat(parts, "hidden"), _cat(parts, "pooled"), _cat(parts, "time_ids"), null)

    @staticmethod
    def join_tokens(parts: Sequence[Conditioning]) -> Conditioning:
        """Prompts side by side along the token axis (regional prompts); the pooled embedding and time ids of the first."""
        if len(parts) == 1:
            return parts[0]
        return Conditioning(torch.cat([p.hidden for p in parts], dim=1), parts[0].pooled, parts[0].time_ids, parts[0].null)

    def rows(self, start: int, stop: int) -> Conditioning:
        return Conditioning(
            self.hidden[start:stop],
            None if self.pooled is None else self.pooled[start:stop],
            None if self.time_ids is None else self.time_ids[start:stop],
            None if self.null is None else self.null[start:stop],
        )

    def select(self, index: torch.Tensor) -> Conditioning:
        """The rows at `index` (a 1-D index tensor), in that order."""
        pick = lambda t: None if t is None else t[index.to(t.device)]  # noqa: E731
        return Conditioning(pick(self.hidden), pick(self.pooled), pick(self.time_ids), pick(self.null))

    def unet_kwargs(self) -> dict:
        added = None
        if self.pooled is not None:
            added = {"text_embeds": self.pooled, "time_ids": self.time_ids}
        return {"encoder_hidden_states": self.hidden, "added_cond_kwargs": added}
