"""The adapter's training objective: caption loss through frozen tower + projector + frozen LLM, its held-out
evaluation and its end-of-run export (registered as ``llava-projector`` by adapters/objective.py)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adapters.data import held_out_batches
from adapters.export import export_llava, save_projector
from adapters.model import caption_loss, caption_token_losses
from adapters.objective import AdapterParts, projector_meta
from vlp.distributed import all_reduce_sum, world_info
from vlp.objectives.base import Objective, RunData, RunEvaluation

log = logging.getLogger(__name__)


@torch.no_grad()
def held_out_loss(model: nn.Module, batches: list[dict[str, torch.Tensor]], device, text_only: bool = False) -> float:
    """Mean caption-token cross-entropy over the held-out pairs of every rank (collective).

    ``text_only``: the LLM alone on the captions without the image (what the adapter has to beat to show that the
    image information reaches the LLM).
    """
    total, count = 0.0, 0.0
    was_training = model.training
    model.eval()
    for b in batches:
        if text_only:
            labels = b["text_labels"].to(device)
            logits = model.llm(
                input_ids=b["text_input_ids"].to(device),
                attention_mask=b["text_attention_mask"].to(device),
                use_cache=False,
            ).logits
        else:
            labels = b["labels"].to(device)
            dtype = next(model.vision.parameters()).dtype
            logits = model(
                b["pixel_values"].to(device, dtype), b["input_ids"].to(device), b["attention_mask"].to(device)
            )
        s, n = caption_token_losses(logits, labels)
        total, count = total + float(s), count + float(n)
    model.train(was_training)
    total, count = all_reduce_sum([total, count], device)
    return total / max(count, 1.0)


class CaptionEvaluation(RunEvaluation):
    """The held-out caption loss before the first step, every ``every`` steps and at the end (all ranks)."""

    def __init__(self, batches: list[dict[str, torch.Tensor]], every: int) -> None:
        self.batches, self.every = batches, every
        self.curve: list[tuple[int, float]] = []
        self.text_only: float | None = None

    def begin(self, module: nn.Module, device: torch.device) -> dict[str, Any]:
        self.text_only = held_out_loss(module, self.batches, device, text_only=True)
        log.info("held-out caption loss of the LLM without the image: %.4f", self.text_only)
        return {"eval/text_only_caption_loss": self.text_only, **self.evaluate(0, module, device)}

    def evaluate(self, step: int, module: nn.Module, device: torch.device) -> dict[str, Any]:
        value = held_out_loss(module, self.batches, device)
        self.curve.append((step, value))
        log.info("step %d: held-out caption loss %.4f", step, value)
        return {"eval/caption_loss": value}

    def state_dict(self) -> dict[str, Any]:
        return {"curve": [[int(a), float(b)] for a, b in self.curve], "text_only": self.text_only}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.curve = [(int(a), float(b)) for a, b in state.get("curve", [])]
        self.text_only = state.get("text_only")

    def final(self, module: nn.Module, device: torch.device, step: int | None = None) -> dict[str, Any]:
        if step is not None and not (self.curve and self.curve[-1][0] == step):
            self.evaluate(step, module, device)
        out: dict[str, Any] = {
            "eval_caption_loss": [list(x) for x in self.curve],
            "eval_text_only_caption_loss": self.text_only,
        }
        if len(self.curve) > 1 and self.curve[0][1] > 0:
            out["eval_loss_drop"] = 1.0 - self.curve[-1][1] / self.curve[0][1]
        return out


class AdapterObjective(Objective):
    """Caption loss of the LLaVA-style adapter; only the projector trains."""

    requires_text = True
    exclude_frozen_from_checkpoints = True  # the tower and the LLM are rebuilt from the config on resume
    supports_zero3 = False  # the frozen parts and the evaluation run outside DeepSpeed's partitioning
    reported_loss_key = "loss/caption"

    def __init__(self, cfg: Any, parts: AdapterParts) -> None:
        super().__init__()
        self.cfg = cfg
        self.parts = parts
        self.model = parts.model
        self.transform = parts.tower.image_transform

    def sample_transform(self, sample: dict[str, Any]) -> dict[str, Any]:
        return {"pixel_values": self.transform(sample["image"]), "text": sample["text"]}

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        return self.parts.collator(samples)

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        dtype = next(self.model.vision.parameters()).dtype
        logits = self.model(batch["pixel_values"].to(dtype), batch["input_ids"], batch["attention_mask"])
        loss, value = caption_loss(logits, batch["labels"], world_info().world_size)
        return loss, {"loss/caption": value, "caption_tokens": float(batch["labels"].ne(-100).sum())}

    def describe(self) -> str:
        t = self.parts.tower
        return (
            f"a {self.cfg.projector.type} projector from {t.describe()} ({t.num_layers} blocks, layer "
            f"{t.feature_layer}, {t.select}: {t.num_positions} positions x {t.hidden_size}) into the LLM "
            f"{self.parts.llm.path} (hidden {self.parts.llm.model.config.hidden_size})"
        )

    def hidden_size(self) -> int:
        return max(self.parts.tower.hidden_size, int(self.parts.llm.model.config.hidden_size))

    def eval_module(self) -> nn.Module:
        return self.model

    def build_plain(self) -> nn.Module:
        return self.model  # the frozen parts are whole on every rank; the projector is small and whole too

    def evaluation(self, cfg: Any, data: RunData) -> RunEvaluation | None:
        if not data.eval_shards or cfg.data.eval_samples <= 0:
            return None
        w = world_info()
        batches = held_out_batches(
            data.eval_shards,
            self.transform,
            self.parts.collator,
            cfg.data.eval_samples,
            cfg.train.batch_size,
            w.rank,
            w.world_size,
            cfg.data.caption_key,
        )
        return CaptionEvaluation(batches, cfg.train.eval_every)

    def export(self, run_dir: Path, state: dict[str, torch.Tensor], summary: dict[str, Any]) -> dict[str, Any]:
        """mm_projector.safetensors (+ .json) from the trained projector, and the LLaVA folder if asked for."""
        projector = self.model.projector
        prefix = "model.projector."
        trained = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if trained:
            projector.load_state_dict(trained)  # the consolidated fp32 weights (equal to the live ones off ZeRO)
        save_projector(projector, projector_meta(self.cfg, self.parts, self.cfg.train.steps), run_dir)
        out: dict[str, Any] = {"projector_checkpoint": str(Path(run_dir) / "mm_projector.safetensors")}
        if self.cfg.export.format == "llava":
            llava_dir = Path(self.cfg.export.dir) if self.cfg.export.dir else Path(run_dir) / "llava"
            llm = self.parts.llm
            export_llava(
                self.parts.tower,
                projector,
                self.cfg.projector.type,
                self.model.llm,
                llm.tokenizer,
                llm.image_token,
                llm.image_token_id,
                llava_dir,
            )
            out["llava_dir"] = str(llava_dir)
        return out

    def summary(self) -> dict[str, Any]:
        return {"projector": self.cfg.projector.type}
