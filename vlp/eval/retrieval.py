"""Image-text retrieval recall on held-out image-caption pairs, where an image may have several captions."""

from __future__ import annotations

from collections.abc import Sequence

import torch

RECALL_KS: tuple[int, ...] = (1, 5, 10)


@torch.no_grad()
def retrieval_metrics(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_to_image: torch.Tensor,
    ks: Sequence[int] = RECALL_KS,
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Image->text and text->image recall@k from normalised features.

    ``text_to_image[j]`` is the index of the image that caption j describes. Image->text: an image counts as a hit
    at k when any of its captions is among its k most similar captions (every image against all of its captions).
    Text->image: a caption is a hit when its image is among its k most similar images. Similarities are computed
    in row chunks so that the full image x caption matrix is never held at once.
    """
    n_img, n_txt = image_features.shape[0], text_features.shape[0]
    if n_img == 0 or n_txt == 0:
        raise ValueError(f"retrieval needs images and captions, got {n_img} images and {n_txt} captions")
    text_to_image = text_to_image.long()
    if text_to_image.shape != (n_txt,) or int(text_to_image.min()) < 0 or int(text_to_image.max()) >= n_img:
        raise ValueError("text_to_image must give, for every caption, the index of an existing image")
    img, txt = image_features.float(), text_features.float()
    kmax = max(ks)
    i2t_hits = {k: 0 for k in ks}
    for s in range(0, n_img, chunk_size):
        sims = img[s : s + chunk_size] @ txt.T
        top = sims.topk(min(kmax, n_txt), dim=1).indices
        owner = text_to_image[top]  # [b, k]: which image each retrieved caption belongs to
        mine = owner == torch.arange(s, s + sims.shape[0])[:, None]
        for k in ks:
            i2t_hits[k] += int(mine[:, :k].any(1).sum())
    t2i_hits = {k: 0 for k in ks}
    for s in range(0, n_txt, chunk_size):
        sims = txt[s : s + chunk_size] @ img.T
        top = sims.topk(min(kmax, n_img), dim=1).indices
        mine = top == text_to_image[s : s + sims.shape[0], None]
        for k in ks:
            t2i_hits[k] += int(mine[:, :k].any(1).sum())
    out = {f"image_to_text_R{k}": i2t_hits[k] / n_img for k in ks}
    out.update({f"text_to_image_R{k}": t2i_hits[k] / n_txt for k in ks})
    out["num_images"] = n_img
    out["num_captions"] = n_txt
    return out
