"""Explicit weight key maps between our towers (open_clip / timm names) and Hugging Face transformers names.

One table per tower family, each a list of :class:`Rule` s that say which of our tensors become which HF tensors
and by what exact, invertible operation (copy, transpose, split of a packed q/k/v projection, ...). The same table
is applied in both directions, so export and import cannot drift apart, and both directions check coverage: a
source tensor that no rule consumes, or a rule whose source is missing, is an error naming the keys, never a
silent partial conversion.

The HF names are those of transformers' ``CLIPModel`` / ``SiglipModel`` (and of the vision models with a
``vision_model.`` prefix), which transformers 4.x and 5.x both read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

OPS = ("copy", "transpose", "split", "squeeze0", "scalar_to_1", "pad_row")


class KeyMapError(ValueError):
    """A state dict does not match the key map of the tower it claims to be (missing, unexpected, bad shape)."""


@dataclass(frozen=True)
class Rule:
    """Our tensor(s) ``ours`` correspond to the HF tensor(s) ``hf`` through ``op``.

    ops (ours -> hf; the inverse is applied for hf -> ours):
      copy        hf = ours
      transpose   hf = ours.T (open_clip stores projections as [in, out] matrices, HF as Linear [out, in])
      split       one side holds the row-wise concatenation of the other side's tensors (packed q/k/v);
                  ``parts`` gives the relative row counts (default: equal)
      squeeze0    ours has a leading dimension of 1 that HF lacks (timm's [1, N, D] position embedding)
      scalar_to_1 ours is a 0-d scalar, HF stores shape [1] (SigLIP's logit scale and bias)
      pad_row     HF holds one extra last row equal to row 0 (the padding token's embedding row)
    """

    ours: tuple[str, ...]
    hf: tuple[str, ...]
    op: str = "copy"
    parts: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        assert self.op in OPS, self.op
        if self.op == "split":
            assert (len(self.ours) == 1) != (len(self.hf) == 1), self
        else:
            assert len(self.ours) == 1 and len(self.hf) == 1, self


def _clone(t: torch.Tensor) -> torch.Tensor:
    # Own storage for every output tensor: safetensors refuses tensors that share memory (views of a split).
    return t.detach().clone().contiguous()


def _split(t: torch.Tensor, n: int, parts: tuple[int, ...], key: str) -> list[torch.Tensor]:
    parts = parts or (1,) * n
    unit, rem = divmod(t.shape[0], sum(parts))
    if rem:
        raise KeyMapError(f"{key}: {t.shape[0]} rows cannot be split in proportions {parts}")
    return [_clone(c) for c in torch.split(t, [p * unit for p in parts], dim=0)]


def _forward(rule: Rule, src: list[torch.Tensor]) -> list[torch.Tensor]:
    """Apply ``rule`` ours -> hf."""
    (x, *rest) = src
    if rule.op == "copy":
        return [_clone(x)]
    if rule.op == "transpose":
        return [_clone(x.T)]
    if rule.op == "squeeze0":
        if x.shape[0] != 1:
            raise KeyMapError(f"{rule.ours[0]}: expected a leading dimension of 1, got shape {tuple(x.shape)}")
        return [_clone(x[0])]
    if rule.op == "scalar_to_1":
        return [_clone(x.reshape(1))]
    if rule.op == "pad_row":
        return [_clone(torch.cat([x, x[:1]], dim=0))]
    # split
    if len(rule.ours) == 1:
        return _split(x, len(rule.hf), rule.parts, rule.ours[0])
    return [_clone(torch.cat(src, dim=0))]


def _backward(rule: Rule, src: list[torch.Tensor]) -> list[torch.Tensor]:
    """Apply ``rule`` hf -> ours (the exact inverse of :func:`_forward`)."""
    (x, *rest) = src
    if rule.op == "copy":
        return [_clone(x)]
    if rule.op == "transpose":
        return [_clone(x.T)]
    if rule.op == "squeeze0":
        return [_clone(x[None])]
    if rule.op == "scalar_to_1":
        if x.numel() != 1:
            raise KeyMapError(f"{rule.hf[0]}: expected a single value, got shape {tuple(x.shape)}")
        return [_clone(x.reshape(()))]
    if rule.op == "pad_row":
        if x.device.type != "meta" and not torch.equal(x[-1], x[0]):
            raise KeyMapError(
                f"{rule.hf[0]}: the last (padding) row differs from row 0; this checkpoint pads with "
                "a token of its own, which the open_clip tokenizer (padding with id 0) cannot reproduce"
            )
        return [_clone(x[:-1])]
    if len(rule.hf) == 1:
        return _split(x, len(rule.ours), rule.parts, rule.hf[0])
    return [_clone(torch.cat(src, dim=0))]


def _apply(state: Mapping[str, torch.Tensor], rules: Sequence[Rule], to_hf: bool, what: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    missing: list[str] = []
    for rule in rules:
        src_keys, dst_keys = (rule.ours, rule.hf) if to_hf else (rule.hf, rule.ours)
        absent = [k for k in src_keys if k not in state]
        if absent:
            missing.extend(absent)
            continue
        used.update(src_keys)
        tensors = (_forward if to_hf else _backward)(rule, [state[k] for k in src_keys])
        for k, t in zip(dst_keys, tensors, strict=True):
            out[k] = t
    unexpected = sorted(set(state) - used)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s): {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(
                f"unexpected {len(unexpected)} key(s): {', '.join(unexpected[:8])}"
                f"{' ...' if len(unexpected) > 8 else ''}"
            )
        raise KeyMapError(f"{what}: " + "; ".join(parts))
    return out


def ours_to_hf(
    state: Mapping[str, torch.Tensor], rules: Sequence[Rule], what: str = "export"
) -> dict[str, torch.Tensor]:
    """Our state dict (open_clip model keys) -> HF state dict; every key must be covered exactly once."""
    return _apply(state, rules, to_hf=True, what=what)


def hf_to_ours(
    state: Mapping[str, torch.Tensor], rules: Sequence[Rule], what: str = "import"
) -> dict[str, torch.Tensor]:
    """HF state dict -> our state dict (open_clip model keys); the exact inverse of :func:`ours_to_hf`."""
    return _apply(state, rules, to_hf=False, what=what)


# --------------------------------------------------------------------------------------------------------------
# The tables. ``o`` is the prefix on our side, ``h`` on the HF side; blocks are expanded for ``layers`` layers.
# --------------------------------------------------------------------------------------------------------------


def _wb(ours: str, hf: str, op: str = "copy") -> list[Rule]:
    return [Rule((f"{ours}.weight",), (f"{hf}.weight",), op), Rule((f"{ours}.bias",), (f"{hf}.bias",), op)]


def _qkv(ours: str, hf: str) -> tuple[str, ...]:
    return tuple(f"{hf}.self_attn.{p}_proj.{ours}" for p in "qkv")


def open_clip_block_rules(o: str, h: str) -> list[Rule]:
    """open_clip ResidualAttentionBlock ``o`` <-> HF CLIP/SigLIP encoder layer ``h`` (same pre-LN structure)."""
    return [
        *_wb(f"{o}.ln_1", f"{h}.layer_norm1"),
        Rule((f"{o}.attn.in_proj_weight",), _qkv("weight", h), "split"),
        Rule((f"{o}.attn.in_proj_bias",), _qkv("bias", h), "split"),
        *_wb(f"{o}.attn.out_proj", f"{h}.self_attn.out_proj"),
        *_wb(f"{o}.ln_2", f"{h}.layer_norm2"),
        *_wb(f"{o}.mlp.c_fc", f"{h}.mlp.fc1"),
        *_wb(f"{o}.mlp.c_proj", f"{h}.mlp.fc2"),
    ]


def timm_block_rules(o: str, h: str) -> list[Rule]:
    """timm ViT Block ``o`` <-> HF SigLIP encoder layer ``h``."""
    return [
        *_wb(f"{o}.norm1", f"{h}.layer_norm1"),
        Rule((f"{o}.attn.qkv.weight",), _qkv("weight", h), "split"),
        Rule((f"{o}.attn.qkv.bias",), _qkv("bias", h), "split"),
        *_wb(f"{o}.attn.proj", f"{h}.self_attn.out_proj"),
        *_wb(f"{o}.norm2", f"{h}.layer_norm2"),
        *_wb(f"{o}.mlp.fc1", f"{h}.mlp.fc1"),
        *_wb(f"{o}.mlp.fc2", f"{h}.mlp.fc2"),
    ]


def clip_vision_rules(
    layers: int, o: str = "visual", h: str = "vision_model", projection: str | None = "visual_projection.weight"
) -> list[Rule]:
    """open_clip VisionTransformer <-> HF CLIPVisionModel (+ ``visual_projection``)."""
    rules = [
        Rule((f"{o}.class_embedding",), (f"{h}.embeddings.class_embedding",)),
        Rule((f"{o}.conv1.weight",), (f"{h}.embeddings.patch_embedding.weight",)),
        Rule((f"{o}.positional_embedding",), (f"{h}.embeddings.position_embedding.weight",)),
        *_wb(f"{o}.ln_pre", f"{h}.pre_layrnorm"),
    ]
    for i in range(layers):
        rules += open_clip_block_rules(f"{o}.transformer.resblocks.{i}", f"{h}.encoder.layers.{i}")
    rules += _wb(f"{o}.ln_post", f"{h}.post_layernorm")
    if projection:
        rules.append(Rule((f"{o}.proj",), (projection,), "transpose"))
    return rules


def clip_text_rules(
    layers: int, o: str = "", h: str = "text_model", projection: str = "text_projection.weight"
) -> list[Rule]:
    """open_clip CLIP's built-in text tower (keys at the model's top level) <-> HF CLIPTextModel."""
    rules = [
        Rule((f"{o}token_embedding.weight",), (f"{h}.embeddings.token_embedding.weight",)),
        Rule((f"{o}positional_embedding",), (f"{h}.embeddings.position_embedding.weight",)),
    ]
    for i in range(layers):
        rules += open_clip_block_rules(f"{o}transformer.resblocks.{i}", f"{h}.encoder.layers.{i}")
    rules += _wb(f"{o}ln_final", f"{h}.final_layer_norm")
    rules.append(Rule((f"{o}text_projection",), (projection,), "transpose"))
    return rules


def siglip_vision_rules(layers: int, o: str = "visual.trunk", h: str = "vision_model") -> list[Rule]:
    """timm MAP-pooled ViT trunk (SigLIP) <-> HF SiglipVisionModel with its attention-pooling head."""
    rules = [
        *_wb(f"{o}.patch_embed.proj", f"{h}.embeddings.patch_embedding"),
        Rule((f"{o}.pos_embed",), (f"{h}.embeddings.position_embedding.weight",), "squeeze0"),
    ]
    for i in range(layers):
        rules += timm_block_rules(f"{o}.blocks.{i}", f"{h}.encoder.layers.{i}")
    p = f"{o}.attn_pool"
    rules += [
        *_wb(f"{o}.norm", f"{h}.post_layernorm"),
        Rule((f"{p}.latent",), (f"{h}.head.probe",)),
        # HF uses torch's MultiheadAttention: one packed in-projection [q; k; v]; timm keeps q and [k; v] apart.
        Rule((f"{p}.q.weight", f"{p}.kv.weight"), (f"{h}.head.attention.in_proj_weight",), "split", (1, 2)),
        Rule((f"{p}.q.bias", f"{p}.kv.bias"), (f"{h}.head.attention.in_proj_bias",), "split", (1, 2)),
        *_wb(f"{p}.proj", f"{h}.head.attention.out_proj"),
        *_wb(f"{p}.norm", f"{h}.head.layernorm"),
        *_wb(f"{p}.mlp.fc1", f"{h}.head.mlp.fc1"),
        *_wb(f"{p}.mlp.fc2", f"{h}.head.mlp.fc2"),
    ]
    return rules


def siglip_text_rules(layers: int, o: str = "text", h: str = "text_model", bpe: bool = True) -> list[Rule]:
    """open_clip TextTransformer (bidirectional, last-token pooled) <-> HF SiglipTextModel.

    With open_clip's BPE vocabulary (``bpe``), the HF embedding table has one extra row, the padding token, equal
    to row 0 (what open_clip pads with); a tower with its own transformers tokenizer keeps its table as it is.
    """
    rules = [
        Rule(
            (f"{o}.token_embedding.weight",), (f"{h}.embeddings.token_embedding.weight",), "pad_row" if bpe else "copy"
        ),
        Rule((f"{o}.positional_embedding",), (f"{h}.embeddings.position_embedding.weight",)),
    ]
    for i in range(layers):
        rules += open_clip_block_rules(f"{o}.transformer.resblocks.{i}", f"{h}.encoder.layers.{i}")
    rules += _wb(f"{o}.ln_final", f"{h}.final_layer_norm")
    rules += _wb(f"{o}.text_projection", f"{h}.head")
    return rules


def logit_rules(siglip: bool, bias: bool) -> list[Rule]:
    """The learnt log temperature (and bias): 0-d scalars in open_clip; CLIPModel scalar, SiglipModel shape [1]."""
    op = "scalar_to_1" if siglip else "copy"
    rules = [Rule(("logit_scale",), ("logit_scale",), op)]
    if bias:
        rules.append(Rule(("logit_bias",), ("logit_bias",), op))
    return rules
