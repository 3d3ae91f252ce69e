"""The self-supervised demos' set (--data.synthetic silhouettes): deterministic, grey silhouettes near the centre
whose only label is the shape named in the caption, and its own cache directory."""

import numpy as np

from data_pipelines import synthetic_silhouettes as sil
from data_pipelines.synthetic import IMAGE_SIZE, SHAPES, ensure_synthetic_data


def test_same_seed_same_image_and_its_own_cache_directory(tmp_path):
    a, b = sil.render_sample(np.random.default_rng(5)), sil.render_sample(np.random.default_rng(5))
    assert a[1:] == b[1:] and np.array_equal(np.asarray(a[0]), np.asarray(b[0]))
    data = ensure_synthetic_data(tmp_path, num_train=8, num_eval=4, seed=0, shard_size=8, kind="silhouettes")
    assert data.root.name == "silhouettes-v1-seed0-train8-eval4-shard8"
    assert data.class_families == {"shape": SHAPES} and set(data.templates) == {"shape"}


def test_grey_light_silhouette_near_the_centre_named_by_the_caption():
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(200):
        img, caption, labels = sil.render_sample(rng)
        px = np.asarray(img).astype(int)
        assert px.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
        assert (px[..., 0] == px[..., 1]).all() and (px[..., 1] == px[..., 2]).all()  # no colour at all
        fg = px[..., 0] >= 175  # the silhouette: brightness 190-255 against a background of 60-130 (+ faint noise)
        assert 0.03 < fg.mean() < 0.5
        ys, xs = np.nonzero(fg)
        # centroid near the centre: the drawing centre is at most 0.1 x 64 px off, and a crescent's centroid sits about
        # half a radius (<= 8 px) off its drawing centre
        assert max(abs(xs.mean() - IMAGE_SIZE / 2), abs(ys.mean() - IMAGE_SIZE / 2)) < 0.25 * IMAGE_SIZE
        assert list(labels) == ["shape"] and caption.endswith(" " + labels["shape"])
        seen.add(labels["shape"])
    assert seen == set(SHAPES)
