"""Text conditioning rows for a UNet call (prompt embeddings, plus SDXL's pooled embeddings and time ids)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class Conditioning:
    """Per-row conditioning; rows line up with the latent rows of the same UNet call."""

    hidden: torch.Tensor  # (B, L, D) encoder hidden states
    pooled: torch.Tensor | None = None  # (B, P) SDXL `text_embeds`
    time_ids: torch.Tensor | None = None  # (B, 6) SDXL `time_ids`

    def __len__(self) -> int:
        return int(self.hidden.shape[0])

    @staticmethod
    def cat(parts: Sequence[Conditioning]) -> Conditioning:
        first = parts[0]
        return Conditioning(
            torch.cat([p.hidden for p in parts]),
            None if first.pooled is None else torch.cat([p.pooled for p in parts]),
            None if first.time_ids is None else torch.cat([p.time_ids for p in parts]),
        )

    @staticmethod
    def join_tokens(parts: Sequence[Conditioning]) -> Conditioning:
        """Prompts side by side along the token axis (regional prompts); the pooled embedding and time ids of the first."""
        if len(parts) == 1:
            return parts[0]
        return Conditioning(torch.cat([p.hidden for p in parts], dim=1), parts[0].pooled, parts[0].time_ids)

    def rows(self, start: int, stop: int) -> Conditioning:
        return Conditioning(
            self.hidden[start:stop],
            None if self.pooled is None else self.pooled[start:stop],
            None if self.time_ids is None else self.time_ids[start:stop],
        )

    def unet_kwargs(self) -> dict:
        added = None
        if self.pooled is not None:
            added = {"text_embeds": self.pooled, "time_ids": self.time_ids}
        return {"encoder_hidden_states": self.hidden, "added_cond_kwargs": added}
