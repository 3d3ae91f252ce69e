"""Read a built tower's exact structure and turn it into a transformers config, or refuse.

Everything is read from the instantiated modules (activation classes, layer-norm eps, LayerScale, q/k norm,
pooling, masks), not from the preset, so a config option that changes the computation cannot slip through. Any
option that transformers' CLIP/SigLIP classes cannot compute exactly is refused with a
:class:`NotRepresentableError` naming the option; nothing is ever exported approximately.
"""

from __future__ import annotations

from typing import Any, Literal

import open_clip
from open_clip.transformer import QuickGELU, ResidualAttentionBlock, TextTransformer, VisionTransformer
from torch import nn

from vlp.config import ConfigError

Family = Literal["clip", "siglip"]

# open_clip's BPE vocabulary: 49152 - 256 - 2 + 1 merges + 2 * 256 byte tokens + 2 special tokens.
BPE_VOCAB_SIZE = 49408
SOT_ID = 49406
EOT_ID = 49407


class NotRepresentableError(ConfigError):
    """The tower uses an option that the requested transformers class cannot compute exactly."""


def _refuse(target: str, problems: list[str]) -> None:
    if problems:
        raise NotRepresentableError(f"cannot export to {target} exactly: " + "; ".join(problems))


def _is_identity(m: nn.Module | None) -> bool:
    return m is None or isinstance(m, nn.Identity)


def activation_name(act: nn.Module) -> str | None:
    """The transformers ``hidden_act`` that computes exactly what ``act`` computes (None if there is none)."""
    from timm.layers import activations as timm_act

    if isinstance(act, (QuickGELU, timm_act.QuickGELU)):
        return "quick_gelu"
    if type(act) is nn.GELU:
        return {"none": "gelu", "tanh": "gelu_pytorch_tanh"}.get(act.approximate)
    if type(act) is timm_act.GELU:
        return "gelu"
    if type(act) is timm_act.GELUTanh:
        return "gelu_pytorch_tanh"
    return None


def _single_activation(acts: list[nn.Module], where: str, problems: list[str]) -> str:
    names = {activation_name(a) for a in acts}
    if None in names:
        bad = next(a for a in acts if activation_name(a) is None)
        problems.append(
            f"{where} activation {bad!r} has no transformers equivalent (valid: GELU, tanh-GELU, QuickGELU)"
        )
        return "gelu"
    if len(names) > 1:
        problems.append(f"{where} mixes activations {sorted(names)}; transformers uses one per tower")
    return sorted(names)[0]


def _single_eps(norms: list[nn.Module], where: str, problems: list[str]) -> float:
    eps = set()
    for n in norms:
        if not isinstance(n, nn.LayerNorm):
            problems.append(f"{where} uses {type(n).__name__} where transformers has LayerNorm")
            continue
        if not n.elementwise_affine or n.bias is None:
            problems.append(f"{where} has a LayerNorm without affine weight/bias")
        eps.add(float(n.eps))
    if len(eps) > 1:
        problems.append(f"{where} mixes layer-norm eps {sorted(eps)}; transformers uses one layer_norm_eps per tower")
    return min(eps) if eps else 1e-5


def _square(size: Any, what: str, problems: list[str]) -> int:
    if isinstance(size, int):
        return size
    h, w = (int(s) for s in size)
    if h != w:
        problems.append(f"non-square {what} {h}x{w} (transformers CLIP/SigLIP take one {what})")
    return h


def _open_clip_blocks(
    blocks: nn.ModuleList, where: str, problems: list[str]
) -> tuple[list[nn.Module], list[nn.Module]]:
    """Check open_clip residual blocks are plain pre-LN blocks; return (activations, norms)."""
    acts, norms = [], []
    for i, blk in enumerate(blocks):
        if not isinstance(blk, ResidualAttentionBlock):
            attn = getattr(blk, "attn", None)
            named = [
                name
                for name, on in (
                    ("qk_norm", not _is_identity(getattr(attn, "ln_q", None))),
                    ("scaled_cosine_attn", bool(getattr(attn, "scaled_cosine", False))),
                    ("scale_heads", getattr(attn, "head_scale", None) is not None),
                    ("scale_attn_inner", not _is_identity(getattr(attn, "ln_inner", None))),
                    ("scale_attn", not _is_identity(getattr(blk, "ln_attn", None))),
                    ("scale_fc", not _is_identity(getattr(getattr(blk, "mlp", None), "ln", None))),
                )
                if on
            ]
            problems.append(f"{where} block_type={type(blk).__name__}" + (f" with {', '.join(named)}" if named else ""))
            return acts, norms
        if not (_is_identity(blk.ls_1) and _is_identity(blk.ls_2)):
            problems.append(f"{where} LayerScale (ls_init_value)")
            return acts, norms
        if hasattr(blk, "ln_1_kv"):
            problems.append(f"{where} cross-attention blocks")
        if blk.attn.in_proj_bias is None or blk.attn.out_proj.bias is None:
            problems.append(f"{where} attention without bias")
        if blk.attn.in_proj_weight is None:
            problems.append(f"{where} attention with separate q/k/v dims (kdim/vdim)")
        acts.append(blk.mlp.gelu)
        norms += [blk.ln_1, blk.ln_2]
        if i == 0 and blk.attn.embed_dim % blk.attn.num_heads:
            problems.append(f"{where} width {blk.attn.embed_dim} not divisible by {blk.attn.num_heads} heads")
    return acts, norms


# --------------------------------------------------------------------------------------------------------------
# Families
# --------------------------------------------------------------------------------------------------------------


def timm_tower_name(visual: nn.Module) -> str:
    """The timm model name of an open_clip TimmModel's trunk."""
    cfg = getattr(visual.trunk, "pretrained_cfg", None) or {}
    return str(cfg.get("architecture") or type(visual.trunk).__name__)


def registered_outside_timm(name: str) -> str | None:
    """The module that registered timm model ``name`` when it is not timm itself (e.g. ``vlp.towers``), else None:
    such a model is built by ``timm.create_model`` only in a process that imported that module."""
    import timm

    try:
        module = timm.models.model_entrypoint(name).__module__
    except (RuntimeError, KeyError):
        return "an unknown module"
    return None if module.startswith("timm.") else module


def outside_timm_error(visual: nn.Module, name: str, owner: str) -> NotRepresentableError:
    """The refusal for a timm tower that only a process importing ``owner`` can build."""
    return NotRepresentableError(
        f"the image tower is timm {type(visual.trunk).__name__} {name!r}, registered by {owner} and not by timm, so "
        "neither transformers (CLIP/SigLIP hold ViTs; TimmWrapperModel builds timm's own models) nor open_clip can "
        "build it without vlp; no export format works for it: load the run with vlp"
    )


def tower_family_name(clip: nn.Module) -> str:
    """'clip', 'siglip' or, for any other timm tower, its timm name (what a model card tags)."""
    try:
        return tower_family(clip)
    except NotRepresentableError:
        return timm_tower_name(clip.visual) if isinstance(clip.visual, open_clip.timm_model.TimmModel) else "vlp"


def tower_family(clip: nn.Module) -> Family:
    """'clip' for open_clip's own ViT (class token, ln_pre), 'siglip' for a timm ViT trunk; else refuse, naming the
    tower family actually used."""
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    visual = clip.visual
    if isinstance(visual, VisionTransformer):
        return "clip"
    if isinstance(visual, open_clip.timm_model.TimmModel):
        if isinstance(visual.trunk, TimmViT):
            return "siglip"
        name = timm_tower_name(visual)
        owner = registered_outside_timm(name)
        if owner:
            raise outside_timm_error(visual, name, owner)
        # open_clip's TimmModel builds timm models by name only, without vision_cfg.timm_model_kwargs
        also = "" if getattr(visual, "timm_model_kwargs", None) else " or --format open_clip"
        raise NotRepresentableError(
            f"the image tower is timm {type(visual.trunk).__name__} {name!r}; transformers' CLIP/SigLIP classes hold "
            f"only ViTs: use --format hf-vision (TimmWrapperModel){also}"
        )
    raise NotRepresentableError(
        f"vision tower {type(visual).__name__} has no transformers CLIP/SigLIP equivalent "
        "(supported: open_clip VisionTransformer, timm ViT with MAP pooling)"
    )


def clip_vision_config(visual: nn.Module) -> dict[str, Any]:
    """CLIPVisionConfig kwargs for an open_clip VisionTransformer (CLIPVisionModelWithProjection)."""
    target = "CLIPVisionModel"
    if not isinstance(visual, VisionTransformer):
        raise NotRepresentableError(f"{target} needs an open_clip VisionTransformer, got {type(visual).__name__}")
    problems: list[str] = []
    if visual.attn_pool is not None:
        problems.append("vision attentional_pool (CLIPVisionModel pools the class token)")
    elif visual.pool_type != "tok":
        problems.append(
            f"vision pool_type={visual.pool_type!r} (average pooling; CLIPVisionModel pools the class token)"
        )
    if _is_identity(visual.ln_pre):
        problems.append("vision no_ln_pre (CLIPVisionModel always applies pre_layrnorm)")
    if visual.proj is None:
        problems.append("vision tower without output projection (CLIPVisionModelWithProjection needs one)")
    if visual.conv1.bias is not None:
        problems.append("patch embedding with bias")
    acts, norms = _open_clip_blocks(visual.transformer.resblocks, "vision", problems)
    norms = [n for n in (visual.ln_pre, visual.ln_post) if not _is_identity(n)] + norms
    act = _single_activation(acts, "vision", problems) if acts else "gelu"
    eps = _single_eps(norms, "vision", problems)
    image_size = _square(visual.image_size, "image size", problems)
    patch_size = _square(visual.patch_size, "patch size", problems)
    _refuse(target, problems)
    blk = visual.transformer.resblocks[0]
    return dict(
        hidden_size=visual.transformer.width,
        intermediate_size=blk.mlp.c_fc.out_features,
        num_hidden_layers=visual.transformer.layers,
        num_attention_heads=blk.attn.num_heads,
        num_channels=visual.conv1.in_channels,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=visual.proj.shape[1],
        hidden_act=act,
        layer_norm_eps=eps,
    )


def clip_text_config(clip: nn.Module) -> dict[str, Any]:
    """CLIPTextConfig kwargs for open_clip CLIP's built-in text tower (causal, pooled at the end-of-text token)."""
    target = "CLIPTextModel"
    if not isinstance(clip, open_clip.CLIP):
        raise NotRepresentableError(f"{target} needs open_clip's CLIP text tower (custom_text: false)")
    problems: list[str] = []
    if clip.attn_mask is None:
        problems.append("text no_causal_mask (CLIPTextModel is causal)")
    if clip.text_pool_type not in ("argmax", "eos") or (clip.text_pool_type == "eos" and clip.text_eos_id != EOT_ID):
        problems.append(f"text pool_type={clip.text_pool_type!r} (CLIPTextModel pools at the end-of-text token)")
    if not isinstance(clip.text_projection, nn.Parameter):
        problems.append("text projection with bias (proj_bias) or without projection (CLIPModel's has neither)")
    if clip.vocab_size != BPE_VOCAB_SIZE:
        problems.append(f"text vocab_size {clip.vocab_size} (the open_clip BPE tokenizer has {BPE_VOCAB_SIZE})")
    acts, norms = _open_clip_blocks(clip.transformer.resblocks, "text", problems)
    act = _single_activation(acts, "text", problems) if acts else "gelu"
    eps = _single_eps([clip.ln_final, *norms], "text", problems)
    _refuse(target, problems)
    blk = clip.transformer.resblocks[0]
    return dict(
        vocab_size=clip.vocab_size,
        hidden_size=clip.transformer.width,
        intermediate_size=blk.mlp.c_fc.out_features,
        num_hidden_layers=clip.transformer.layers,
        num_attention_heads=blk.attn.num_heads,
        max_position_embeddings=clip.positional_embedding.shape[0],
        projection_dim=clip.text_projection.shape[1],
        hidden_act=act,
        layer_norm_eps=eps,
        bos_token_id=SOT_ID,
        eos_token_id=EOT_ID,
        pad_token_id=EOT_ID,
    )


def siglip_vision_config(visual: nn.Module) -> dict[str, Any]:
    """SiglipVisionConfig kwargs for an open_clip TimmModel wrapping a timm MAP-pooled ViT (SigLIP)."""
    if not isinstance(visual, open_clip.timm_model.TimmModel):
        raise NotRepresentableError(f"SiglipVisionModel needs a timm ViT trunk, got {type(visual).__name__}")
    return siglip_trunk_config(visual.trunk, visual.head)


def siglip_trunk_config(trunk: nn.Module, head: nn.Module | None = None) -> dict[str, Any]:
    """SiglipVisionConfig kwargs for a bare timm ViT trunk (``head``: open_clip's projection after it, if any)."""
    from timm.layers import AttentionPoolLatent, Mlp, PatchEmbed
    from timm.models.vision_transformer import Attention, Block
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    target = "SiglipVisionModel"
    problems: list[str] = []
    if type(trunk) is not TimmViT:
        raise NotRepresentableError(
            f"{target}: timm trunk {type(trunk).__name__} is not a plain timm VisionTransformer"
        )
    if (head is not None and len(head)) or not _is_identity(trunk.head) or not _is_identity(trunk.fc_norm):
        problems.append(
            "a projection after the pooled features (timm_proj: linear/mlp or a classifier head; "
            "SiglipVisionModel ends at the attention-pooling head, use timm_proj: none)"
        )
    pool = trunk.attn_pool
    if not isinstance(pool, AttentionPoolLatent):
        problems.append(
            f"vision pooling {trunk.global_pool!r} (SiglipVisionModel uses MAP attention pooling, timm_pool: map)"
        )
    if trunk.num_prefix_tokens:
        problems.append(f"{trunk.num_prefix_tokens} class/register token(s) (SiglipVisionModel has none)")
    if trunk.pos_embed is None or trunk.dynamic_img_size:
        problems.append("no learnt absolute position embedding or dynamic_img_size")
    pe = trunk.patch_embed
    if type(pe) is not PatchEmbed or not _is_identity(pe.norm) or pe.proj.bias is None or not pe.flatten:
        problems.append("patch embedding other than a biased convolution (SiglipVisionEmbeddings)")
    if not _is_identity(trunk.norm_pre):
        problems.append("pre-norm before the blocks (norm_pre; SiglipVisionModel has none)")
    acts: list[nn.Module] = []
    norms: list[nn.Module] = [trunk.norm]
    for blk in trunk.blocks:
        if type(blk) is not Block:
            problems.append(f"block type {type(blk).__name__} (only timm's pre-LN Block)")
            break
        if not (_is_identity(blk.ls1) and _is_identity(blk.ls2)):
            problems.append("LayerScale (init_values)")
            break
        attn = blk.attn
        if type(attn) is not Attention:
            problems.append(f"attention type {type(attn).__name__}")
            break
        if not (_is_identity(attn.q_norm) and _is_identity(attn.k_norm)):
            problems.append("qk_norm")
            break
        if not _is_identity(attn.norm) or getattr(attn, "gate", None) is not None:
            problems.append("attention inner norm or gate (scale_attn_norm / gated attention)")
            break
        if attn.qkv.bias is None or attn.proj.bias is None or attn.attn_dim != blk.norm1.normalized_shape[0]:
            problems.append("attention without q/k/v/out biases or with a head width that changes the width")
            break
        if type(blk.mlp) is not Mlp or not _is_identity(blk.mlp.norm) or blk.mlp.fc1.bias is None:
            problems.append(f"MLP {type(blk.mlp).__name__} (only a plain fc1-act-fc2 MLP with biases)")
            break
        acts.append(blk.mlp.act)
        norms += [blk.norm1, blk.norm2]
    width = trunk.embed_dim
    blk0 = trunk.blocks[0]
    if isinstance(pool, AttentionPoolLatent):
        if pool.latent_len != 1 or pool.latent_dim != width or not isinstance(pool.q, nn.Linear):
            problems.append("MAP head with several latents, a latent of another width or no query projection")
        if pool.pos_embed is not None or not (_is_identity(pool.q_norm) and _is_identity(pool.k_norm)):
            problems.append("MAP head with its own position embedding or qk_norm")
        if pool.pool != "token" or pool.mlp is None or not isinstance(pool.proj, nn.Linear):
            problems.append(f"MAP head pool={pool.pool!r} or without output projection/MLP")
        elif isinstance(blk0.mlp, Mlp) and pool.mlp.fc1.out_features != blk0.mlp.fc1.out_features:
            problems.append(
                f"MAP head MLP width {pool.mlp.fc1.out_features} differs from the blocks' "
                f"{blk0.mlp.fc1.out_features} (SigLIP's pooling head shares intermediate_size)"
            )
        if pool.num_heads != blk0.attn.num_heads:
            problems.append(f"MAP head with {pool.num_heads} heads, blocks with {blk0.attn.num_heads}")
        if pool.q.bias is None or pool.kv.bias is None:
            problems.append("MAP head attention without bias")
        if pool.mlp is not None:
            acts.append(pool.mlp.act)
            norms.append(pool.norm)
    act = _single_activation(acts, "vision", problems) if acts else "gelu"
    eps = _single_eps(norms, "vision", problems)
    image_size = _square(pe.img_size, "image size", problems)
    patch_size = _square(pe.patch_size, "patch size", problems)
    _refuse(target, problems)
    return dict(
        hidden_size=width,
        intermediate_size=blk0.mlp.fc1.out_features,
        num_hidden_layers=len(trunk.blocks),
        num_attention_heads=blk0.attn.num_heads,
        num_channels=pe.proj.in_channels,
        image_size=image_size,
        patch_size=patch_size,
        hidden_act=act,
        layer_norm_eps=eps,
        vision_use_head=True,
    )


def siglip_text_config(clip: nn.Module, own_tokenizer: bool = False) -> dict[str, Any]:
    """SiglipTextConfig kwargs for an open_clip TextTransformer (bidirectional, pooled at the last position).

    With open_clip's BPE tokenizer, the vocabulary gets one extra token, the padding token, whose embedding row is a
    copy of row 0: open_clip pads with id 0 (the BPE token "!"), and a pad token spelled "!" would also swallow real
    exclamation marks in the HF tokenizer, so padding needs an id of its own with the same embedding. A tower with
    its own transformers tokenizer (``own_tokenizer``: an imported SigLIP's SentencePiece or Gemma vocabulary) keeps
    its vocabulary; the caller fills in that tokenizer's special-token ids.
    """
    target = "SiglipTextModel"
    text = getattr(clip, "text", None)
    if not isinstance(text, TextTransformer):
        raise NotRepresentableError(
            f"{target} needs an open_clip TextTransformer (custom_text: true), got "
            f"{type(text).__name__ if text is not None else 'the CLIP built-in text tower'}"
        )
    problems: list[str] = []
    if text.attn_mask is not None:
        problems.append("causal text mask (SiglipTextModel attends bidirectionally; set no_causal_mask: true)")
    if text.pool_type != "last":
        problems.append(f"text pool_type={text.pool_type!r} (SiglipTextModel pools the last position)")
    if text.cls_emb is not None:
        problems.append("text embed_cls")
    if text.use_pad_mask:
        problems.append("text use_pad_mask (open_clip masks every id-0 token, including real '!' tokens)")
    if not isinstance(text.text_projection, nn.Linear) or text.text_projection.bias is None:
        problems.append("text projection without bias (SiglipTextModel's head is a biased Linear; proj_bias: true)")
    if text.vocab_size != BPE_VOCAB_SIZE and not own_tokenizer:
        problems.append(f"text vocab_size {text.vocab_size} (the open_clip BPE tokenizer has {BPE_VOCAB_SIZE})")
    acts, norms = _open_clip_blocks(text.transformer.resblocks, "text", problems)
    act = _single_activation(acts, "text", problems) if acts else "gelu"
    eps = _single_eps([text.ln_final, *norms], "text", problems)
    _refuse(target, problems)
    blk = text.transformer.resblocks[0]
    if own_tokenizer:
        ids: dict[str, Any] = {}
    else:
        ids = dict(bos_token_id=SOT_ID, eos_token_id=EOT_ID, pad_token_id=BPE_VOCAB_SIZE)
    return dict(
        vocab_size=text.vocab_size + (0 if own_tokenizer else 1),
        hidden_size=text.width,
        intermediate_size=blk.mlp.c_fc.out_features,
        num_hidden_layers=text.transformer.layers,
        num_attention_heads=blk.attn.num_heads,
        max_position_embeddings=text.positional_embedding.shape[0],
        projection_size=text.text_projection.out_features,
        hidden_act=act,
        layer_norm_eps=eps,
        **ids,
    )


def logit_values(clip: nn.Module) -> tuple[float, float | None]:
    """(t, b): the learnt log temperature and bias (None without bias)."""
    scale = float(clip.logit_scale.detach().reshape(()).float()) if clip.logit_scale.device.type != "meta" else 0.0
    bias = getattr(clip, "logit_bias", None)
    if bias is None:
        return scale, None
    return scale, float(bias.detach().reshape(()).float()) if bias.device.type != "meta" else 0.0


def num_text_layers(clip: nn.Module) -> int:
    return len((clip.text if hasattr(clip, "text") else clip).transformer.resblocks)


def num_vision_layers(clip: nn.Module) -> int:
    v = clip.visual
    return len(v.transformer.resblocks) if isinstance(v, VisionTransformer) else len(v.trunk.blocks)


def is_meta(module: nn.Module) -> bool:
    return any(p.device.type == "meta" for p in module.parameters())
