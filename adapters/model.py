"""Frozen vision tower + trained projector + frozen causal LLM, and the caption loss.

The forward pass is transformers' LLaVA one: the LLM embeds the input ids, the projected image features replace
the embeddings at the (already expanded) image token positions, and the LLM runs on those embeddings. Only the
projector has trainable parameters; the tower runs without gradient and both frozen parts stay in eval mode.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from adapters.data import IGNORE_INDEX
from adapters.vision import FrozenVisionTower


class LlavaAdapter(nn.Module):
    """The adapter model; ``forward`` returns next-token logits [B, L, V]."""

    def __init__(
        self,
        vision: FrozenVisionTower,
        projector: nn.Module,
        llm: nn.Module,
        image_token_id: int,
        projector_type: str = "mlp2x_gelu",
        llm_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.vision = vision
        self.projector = projector
        self.llm = llm
        self.image_token_id = image_token_id
        self.projector_type = projector_type
        self.llm_checkpointing = llm_checkpointing

    def train(self, mode: bool = True) -> LlavaAdapter:
        """Only the projector follows ``mode``; the tower stays in eval mode, and so does the LLM unless it uses
        gradient checkpointing (which transformers only applies in training mode)."""
        self.training = mode
        self.projector.train(mode)
        self.vision.train(False)
        self.llm.train(mode and self.llm_checkpointing)
        return self

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected features [B, N, llm hidden size] (gradient flows into the projector only)."""
        feats = self.vision(pixel_values)
        proj_dtype = next(self.projector.parameters()).dtype
        return self.projector(feats.to(proj_dtype))

    def splice(self, input_ids: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        """Input embeddings with the image token positions replaced, in order, by ``image_features``."""
        embeds = self.llm.get_input_embeddings()(input_ids)
        mask = input_ids == self.image_token_id
        n_tokens, n_feats = int(mask.sum()), image_features.shape[0] * image_features.shape[1]
        if n_tokens != n_feats:
            raise ValueError(
                f"{n_tokens} image token positions in the batch but {n_feats} image feature "
                f"positions ({image_features.shape[0]} images x {image_features.shape[1]}); captions "
                "truncated into the image positions or an image token in the text?"
            )
        return embeds.masked_scatter(mask.unsqueeze(-1), image_features.to(embeds.dtype))

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        embeds = self.splice(input_ids, self.image_features(pixel_values))
        out = self.llm(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False, return_dict=True)
        return out.logits


def caption_token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of next-token cross-entropies over labelled positions, number of labelled positions), in fp32.

    Position t's logits predict label t+1, as in transformers' causal LM loss.
    """
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    total = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return total, (shift_labels != IGNORE_INDEX).sum()


def global_token_count(count: torch.Tensor) -> torch.Tensor:
    """Caption tokens summed over all ranks (no-op on one process)."""
    count = count.detach().to(torch.float64)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        count = count.clone()
        dist.all_reduce(count)
    return count


def caption_loss(logits: torch.Tensor, labels: torch.Tensor, world_size: int = 1) -> tuple[torch.Tensor, float]:
    """(loss to backpropagate, mean caption-token cross-entropy of the global batch).

    The global mean divides by the number of caption tokens over all ranks. Data-parallel engines average
    gradients over ranks, so the local loss is scaled by ``world_size``: the averaged gradient is then exactly the
    gradient of the global-batch mean, whatever the number of caption tokens on each rank.
    """
    total, count = caption_token_losses(logits, labels)
    n = global_token_count(count).clamp(min=1)
    loss = total * (world_size / n.to(total.dtype))
    value = total.detach().to(torch.float64)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value)
    return loss, float(value / n)
