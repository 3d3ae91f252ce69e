"""What a training run evaluates: its held-out sets, built from the run's config.

:func:`heldout_sets` serves ``--eval-every``, the end of a run (vlp/objectives/evaluation.py) and
``scripts/eval_zeroshot.py --checkpoint RUN``, so all three measure the same thing.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

from vlp.config import ConfigError, PretrainConfig, ZeroShotDataConfig
from vlp.eval.engine import EvalSet
from vlp.eval.sources import HFDatasetSource, ImageFolderSource, WebDatasetSource, expand_shards
from vlp.eval.zeroshot import Template, load_classnames, load_templates

log = logging.getLogger(__name__)

HELDOUT = "heldout"


def labelled_set(cfg: ZeroShotDataConfig) -> EvalSet:
    """The evaluation set a :class:`ZeroShotDataConfig` names (image folder, WebDataset shards or HF dataset)."""
    if not cfg.enabled:
        raise ConfigError("no labelled image source: give --image-folder, --wds-shards or --hf-dataset")
    classnames = load_classnames(cfg.classnames) if cfg.classnames else None
    templates = load_templates(cfg.templates)
    if cfg.image_folder:
        source = ImageFolderSource(cfg.image_folder, classnames, cfg.name)
    elif cfg.wds_shards:
        if classnames is None:
            raise ConfigError(
                "WebDataset shards carry only labels: pass --classnames (imagenet, or a .txt/.json "
                "file with one name per class index)"
            )
        name = cfg.name or Path(expand_shards(cfg.wds_shards)[0]).parent.name or "shards"
        source = WebDatasetSource(cfg.wds_shards, {name: cfg.label_key or "cls"}, {name: classnames}, name=name)
    else:
        source = HFDatasetSource(
            cfg.hf_dataset, cfg.hf_split, cfg.image_key, cfg.label_key or "label", classnames, cfg.name
        )
    return EvalSet(source, {source.name: templates})


def run_heldout_data(
    cfg: PretrainConfig,
) -> tuple[str | None, dict[str, list[str]] | None, dict[str, list[str]] | None]:
    """(eval shards, class families, templates) of a run, resolved as its training loop resolved them: the
    user's eval shards, or the embedded synthetic set's held-out split with its label families."""
    if cfg.data.train_shards:
        return cfg.data.eval_shards, None, None
    from data_pipelines.synthetic import synthetic_data_for

    synth = synthetic_data_for(cfg.data)
    return cfg.data.eval_shards or synth.eval_shards, synth.class_families, synth.templates


def heldout_sets(
    cfg: PretrainConfig,
    eval_shards: str | None,
    class_families: Mapping[str, Sequence[str]] | None,
    templates: Mapping[str, Sequence[Template]] | None,
) -> list[EvalSet]:
    """A run's held-out evaluation: label families and caption retrieval on its eval shards, plus the labelled
    set of ``cfg.eval.classification`` if one is configured."""
    sets = []
    if eval_shards and (class_families or cfg.eval.retrieval):
        families = dict(class_families or {})
        source = WebDatasetSource(
            eval_shards,
            {f: f"json:{f}" for f in families},
            families,
            caption_key=cfg.data.caption_key if cfg.eval.retrieval else None,
            name=HELDOUT,
        )
        sets.append(EvalSet(source, dict(templates or {}), retrieval=HELDOUT if cfg.eval.retrieval else None))
    if cfg.eval.classification.enabled:
        sets.append(labelled_set(cfg.eval.classification))
    return sets
