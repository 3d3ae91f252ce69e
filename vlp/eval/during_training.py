"""What a training run evaluates (its held-out data) and the periodic ``--eval-every N`` hook.

The held-out evaluation sets are built from a run's config by :func:`heldout_sets`, which the standalone CLI uses
too, so ``--eval-every`` in training and ``scripts/eval_zeroshot.py --checkpoint RUN`` measure the same thing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vlp.config import ConfigError, PretrainConfig, ZeroShotDataConfig
from vlp.eval.engine import EvalOptions, EvalSet, ZeroShotModel, evaluate, flatten_metrics
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
            raise ConfigError("WebDataset shards carry only labels: pass --classnames (imagenet, or a .txt/.json "
                              "file with one name per class index)")
        name = cfg.name or Path(expand_shards(cfg.wds_shards)[0]).parent.name or "shards"
        source = WebDatasetSource(cfg.wds_shards, {name: cfg.label_key or "cls"}, {name: classnames}, name=name)
    else:
        source = HFDatasetSource(cfg.hf_dataset, cfg.hf_split, cfg.image_key, cfg.label_key or "label", classnames,
                                 cfg.name)
    return EvalSet(source, {source.name: templates})


def run_heldout_data(cfg: PretrainConfig) -> tuple[str | None, dict[str, list[str]] | None,
                                                      dict[str, list[str]] | None]:
    """(eval shards, class families, templates) of a run, resolved as its training loop resolved them: the
    user's eval shards, or the embedded synthetic set's held-out split with its label families."""
    if cfg.data.train_shards:
        return cfg.data.eval_shards, None, None
    from data_pipelines.synthetic import ensure_synthetic_data

    synth = ensure_synthetic_data(cfg.data.synthetic_dir, cfg.data.synthetic_train_samples,
                                  cfg.data.synthetic_eval_samples, seed=0)
    return cfg.data.eval_shards or synth.eval_shards, synth.class_families, synth.templates


def heldout_sets(cfg: PretrainConfig, eval_shards: str | None, class_families: Mapping[str, Sequence[str]] | None,
                 templates: Mapping[str, Sequence[Template]] | None) -> list[EvalSet]:
    """A run's held-out evaluation: label families and caption retrieval on its eval shards, plus the labelled
    set of ``cfg.eval.classification`` if one is configured."""
    sets = []
    if eval_shards and (class_families or cfg.eval.retrieval):
        families = dict(class_families or {})
        source = WebDatasetSource(eval_shards, {f: f"json:{f}" for f in families}, families,
                                  caption_key=cfg.data.caption_key if cfg.eval.retrieval else None, name=HELDOUT)
        sets.append(EvalSet(source, dict(templates or {}), retrieval=HELDOUT if cfg.eval.retrieval else None))
    if cfg.eval.classification.enabled:
        sets.append(labelled_set(cfg.eval.classification))
    return sets


class TrainingEvaluator:
    """Runs the held-out evaluation every ``cfg.eval.every`` steps on all ranks; metrics come back on the main
    process (``{}`` elsewhere and between evaluations). Evaluation never touches the training RNG streams."""

    def __init__(self, every: int, sets: list[EvalSet], options: EvalOptions, tokenizer=None, transform=None) -> None:
        self.every, self.sets, self.options = every, sets, options
        self.tokenizer, self.transform = tokenizer, transform
        if every and not sets:
            log.warning("eval.every=%d but there is no held-out data to evaluate (set data.eval_shards or "
                        "eval.classification); periodic evaluation is off", every)
            self.every = 0

    @classmethod
    def from_config(cls, cfg: PretrainConfig, eval_shards: str | None, class_families=None, templates=None,
                    tokenizer=None, transform=None) -> TrainingEvaluator:
        """Resolve the held-out sets once, before training (a bad config fails before the first step)."""
        sets = heldout_sets(cfg, eval_shards, class_families, templates) if cfg.eval.every else []
        options = EvalOptions(batch_size=cfg.eval.batch_size, workers=cfg.eval.workers)
        return cls(cfg.eval.every, sets, options, tokenizer, transform)

    def evaluate(self, model) -> dict[str, Any]:
        """Evaluate ``model`` (a DualTower) now; flat metrics on the main process."""
        t0 = time.perf_counter()
        zs = ZeroShotModel.from_dual_tower(model, self.tokenizer, self.transform)
        out = evaluate(zs, self.sets, self.options)
        if out.results is None:
            return {}
        flat = flatten_metrics(out.results)
        flat["eval_time_s"] = time.perf_counter() - t0
        return flat

    def maybe_evaluate(self, step: int, model) -> dict[str, Any]:
        """Evaluate when ``step`` is a multiple of ``every``; otherwise ``{}``."""
        if not self.every or step % self.every:
            return {}
        return self.evaluate(model)

