"""Labelled (and captioned) image sources for evaluation: an image folder, WebDataset shards, a HF dataset.

Every source yields :class:`Record` s in a fixed order: a key, a lazy image loader (so that a process decodes only
the images it encodes), integer class labels per label family and the captions. Labels are mapped to class indices
here, so a class-name list that does not fit the data fails the same way in every process. A source knows its
families' class names where the data names them (folder names, a ``ClassLabel``) or from a class-name file.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from vlp.config import ConfigError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
WDS_IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")

ClassNames = Sequence[str] | Mapping[str, str]


@dataclass
class Record:
    """One image: key, lazy loader, class index per label family (absent: unlabelled there), captions."""

    key: str
    load_image: Callable[[], Image.Image]
    labels: dict[str, int] = field(default_factory=dict)
    captions: list[str] = field(default_factory=list)


class ImageSource:
    """A fixed, ordered set of images with class labels for some families and possibly captions."""

    name: str
    families: dict[str, list[str]]
    """Class names per label family, by class index."""

    def records(self) -> Iterator[Record]:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"type": type(self).__name__, "name": self.name}


def _open_rgb(path_or_bytes: str | Path | bytes) -> Image.Image:
    src = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
    with Image.open(src) as im:
        return im.convert("RGB")


def _pretty(raw: str) -> str:
    return raw.replace("_", " ").strip()


# ----------------------------------------------------------------------------------------------------------------
# Image folder
# ----------------------------------------------------------------------------------------------------------------


def _folder_class_names(root: Path, folders: list[str], classnames: ClassNames | None) -> tuple[list[str], list[str]]:
    """(folders in class-index order, class names) for an image folder and an optional class-name list/mapping."""
    if classnames is None:
        return folders, [_pretty(f) for f in folders]
    if isinstance(classnames, Mapping):
        missing = [k for k in classnames if k not in folders]
        if missing:
            raise ConfigError(
                f"missing class folder {root / missing[0]} for class {classnames[missing[0]]!r} "
                f"({len(missing)} of {len(classnames)} classes have no folder)"
            )
        unnamed = [f for f in folders if f not in classnames]
        if unnamed:
            raise ConfigError(
                f"class folder {root / unnamed[0]} has no entry in the class-name mapping "
                f"({len(unnamed)} folder(s) unnamed)"
            )
        order = list(classnames)
        return order, [classnames[k] for k in order]
    names = list(classnames)
    folder_set = set(folders)
    by_name = [n for n in names if n in folder_set or n.replace(" ", "_") in folder_set]
    if by_name and len(by_name) == len(folders):  # folders are named after the classes: match by name
        missing = [n for n in names if n not in folder_set and n.replace(" ", "_") not in folder_set]
        if missing:
            raise ConfigError(
                f"missing class folder {root / missing[0]} for class {missing[0]!r} "
                f"({len(missing)} of {len(names)} listed classes have no folder)"
            )
        order = [n if n in folder_set else n.replace(" ", "_") for n in names]
        return order, names
    if by_name and len(names) > len(folders):
        missing = [n for n in names if n not in folder_set and n.replace(" ", "_") not in folder_set]
        raise ConfigError(
            f"missing class folder {root / missing[0]} for class {missing[0]!r} "
            f"({len(names)} class names but {len(folders)} class folders in {root})"
        )
    if len(names) != len(folders):
        raise ConfigError(
            f"class-name count mismatch: {len(names)} class names given but {len(folders)} class "
            f"folders in {root}; give one name per class folder (in sorted folder order)"
        )
    return folders, names  # e.g. ImageNet: wnid folders in sorted order, names by position


class ImageFolderSource(ImageSource):
    """``root/<class>/<image>``: one sub-folder per class (sorted, as torchvision's ImageFolder), images inside.

    Class names default to the folder names (underscores read as spaces). A class-name list either names the
    folders (then matched by name, and a listed class without a folder is an error) or gives one name per folder
    in sorted folder order (ImageNet's wnid folders); a mapping goes from folder name to class name.
    """

    def __init__(self, root: str | Path, classnames: ClassNames | None = None, name: str | None = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise ConfigError(f"image folder not found: {self.root}")
        folders = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not folders:
            raise ConfigError(f"{self.root}: no class sub-folders; expected {self.root}/<class name>/<image files>")
        self.name = name or self.root.name
        self._folders, names = _folder_class_names(self.root, folders, classnames)
        self.families = {self.name: names}
        self._files: list[tuple[Path, int]] = []
        for idx, folder in enumerate(self._folders):
            files = sorted(
                p for p in (self.root / folder).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
            )
            if not files:
                raise ConfigError(f"class folder {self.root / folder} has no images ({', '.join(IMAGE_EXTENSIONS)})")
            self._files.extend((f, idx) for f in files)

    def __len__(self) -> int:
        return len(self._files)

    def records(self) -> Iterator[Record]:
        for path, idx in self._files:
            yield Record(str(path.relative_to(self.root)), lambda p=path: _open_rgb(p), {self.name: idx})

    def describe(self) -> dict[str, Any]:
        return {"type": "image_folder", "name": self.name, "root": str(self.root), "num_images": len(self)}


# ----------------------------------------------------------------------------------------------------------------
# WebDataset shards
# ----------------------------------------------------------------------------------------------------------------


def expand_shards(spec: str) -> list[str]:
    """Shard URLs of a brace pattern (``::`` joins several); local files must exist."""
    import braceexpand

    urls = [u for part in spec.split("::") for u in braceexpand.braceexpand(part)]
    local = [u for u in urls if "://" not in u and not u.startswith("pipe:")]
    missing = [u for u in local if not Path(u).is_file()]
    if missing:
        raise ConfigError(f"{len(missing)} of {len(urls)} shards not found (first: {missing[0]}) for {spec!r}")
    return urls


def _label_map(classnames: ClassNames) -> tuple[list[str], dict[str, int]]:
    """Class names by index and a raw-label -> index lookup (names, and mapping keys for a mapping)."""
    if isinstance(classnames, Mapping):
        names = list(classnames.values())
        lookup = {str(k): i for i, k in enumerate(classnames)}
        lookup.update({v: i for i, v in enumerate(names)})
        return names, lookup
    names = list(classnames)
    return names, {n: i for i, n in enumerate(names)}


def map_label(raw: Any, names: list[str], lookup: dict[str, int], family: str, key: str) -> int:
    """The class index of a raw label: an integer index, or a class name / mapping key."""
    if isinstance(raw, bool):
        raw = str(raw)
    if isinstance(raw, int):
        if not 0 <= raw < len(names):
            raise ConfigError(
                f"class-name count mismatch: sample {key} has {family} label {raw} but only "
                f"{len(names)} class names are given (valid labels 0..{len(names) - 1})"
            )
        return raw
    if isinstance(raw, str):
        s = raw.strip()
        if s in lookup:
            return lookup[s]
        if s.lstrip("-").isdigit():
            return map_label(int(s), names, lookup, family, key)
    raise ConfigError(
        f"sample {key}: {family} label {raw!r} is not among the {len(names)} class names (first few: {names[:5]})"
    )


def _field(sample: dict, key: str, what: str) -> Any:
    """A member (``cls``, ``txt``) as text, or a field of the json member (``json:FIELD``); None when absent."""
    if key.startswith("json:"):
        raw = sample.get("json")
        if raw is None:
            return None
        return json.loads(raw).get(key[5:])
    raw = sample.get(key)
    return None if raw is None else raw.decode("utf-8").strip()


def check_member_key(key: str, what: str) -> None:
    if key.startswith("json:") and len(key) > 5:
        return
    if key and ":" not in key and "." not in key:
        return
    raise ConfigError(f"bad {what} key {key!r}; use a member extension such as 'cls' or 'txt', or 'json:FIELD'")


class WebDatasetSource(ImageSource):
    """WebDataset shards: the image member, class labels from ``cls`` or ``json:FIELD``, captions from ``txt`` or
    ``json:FIELD`` (a string or a list of strings).

    ``label_keys`` maps each label family to its key and ``classnames`` each family to its class names (integer
    labels index them; string labels are looked up by name). Samples are read in shard order.
    """

    def __init__(
        self,
        shards: str,
        label_keys: Mapping[str, str] | None = None,
        classnames: Mapping[str, ClassNames] | None = None,
        caption_key: str | None = None,
        name: str | None = None,
    ) -> None:
        self.spec = shards
        self.urls = expand_shards(shards)
        self.label_keys = dict(label_keys or {})
        for fam, key in self.label_keys.items():
            check_member_key(key, f"label ({fam})")
        if caption_key:
            check_member_key(caption_key, "caption")
        self.caption_key = caption_key
        classnames = dict(classnames or {})
        missing = [f for f in self.label_keys if f not in classnames]
        if missing:
            raise ConfigError(
                f"WebDataset source {shards!r}: class names for {missing[0]!r} are needed "
                "(pass a class-name file: the shards carry only labels)"
            )
        self._maps = {f: _label_map(classnames[f]) for f in self.label_keys}
        self.families = {f: m[0] for f, m in self._maps.items()}
        self.name = name or Path(self.urls[0]).parent.name or "shards"

    def _samples(self) -> Iterator[dict]:
        import webdataset as wds

        pipeline = wds.DataPipeline(
            wds.SimpleShardList(self.urls), wds.tarfile_to_samples(handler=wds.warn_and_continue)
        )
        return iter(pipeline)

    def records(self) -> Iterator[Record]:
        for sample in self._samples():
            key = sample["__key__"]
            member = next((m for m in WDS_IMAGE_MEMBERS if m in sample), None)
            if member is None:
                continue
            labels = {}
            for fam, lkey in self.label_keys.items():
                try:
                    raw = _field(sample, lkey, "label")
                except (json.JSONDecodeError, UnicodeDecodeError):
                    raw = None
                if raw is not None and raw != "":
                    names, lookup = self._maps[fam]
                    labels[fam] = map_label(raw, names, lookup, fam, key)
            captions: list[str] = []
            if self.caption_key:
                try:
                    raw = _field(sample, self.caption_key, "caption")
                except (json.JSONDecodeError, UnicodeDecodeError):
                    raw = None
                raw_list = raw if isinstance(raw, list) else [raw]
                captions = [c.strip() for c in raw_list if isinstance(c, str) and c.strip()]
            yield Record(key, lambda b=sample[member]: _open_rgb(b), labels, captions)

    def describe(self) -> dict[str, Any]:
        return {
            "type": "webdataset",
            "name": self.name,
            "shards": self.spec,
            "num_shards": len(self.urls),
            "label_keys": self.label_keys,
            "caption_key": self.caption_key,
        }


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face datasets
# ----------------------------------------------------------------------------------------------------------------


def _load_hf(path: str, split: str | None):
    import datasets

    p = Path(path)
    if p.is_dir() and any((p / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
        ds = datasets.load_from_disk(str(p))
    else:
        try:
            ds = datasets.load_dataset(path, split=split)
        except Exception as e:  # noqa: BLE001 - any loader failure is a user-facing "cannot load"
            raise ConfigError(f"cannot load Hugging Face dataset {path!r} (split {split!r}): {e}") from e
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds)
        if split is None and len(splits) == 1:
            split = splits[0]
        if split not in ds:
            raise ConfigError(f"{path}: choose a split with --hf-split; valid: {', '.join(splits)}")
        ds = ds[split]
    return ds


class HFDatasetSource(ImageSource):
    """A Hugging Face dataset (saved with ``save_to_disk``, or anything ``load_dataset`` reads) with an image
    column and a ``ClassLabel`` column; the ``ClassLabel`` names are the class names unless overridden."""

    def __init__(
        self,
        path: str,
        split: str | None = None,
        image_key: str = "image",
        label_key: str = "label",
        classnames: ClassNames | None = None,
        name: str | None = None,
    ) -> None:
        import datasets

        ds = _load_hf(path, split)
        for col, what in ((image_key, "image"), (label_key, "label")):
            if col not in ds.column_names:
                raise ConfigError(f"{path}: no {what} column {col!r}; columns: {', '.join(ds.column_names)}")
        feature = ds.features[label_key]
        if isinstance(feature, datasets.ClassLabel):
            base = list(feature.names)
        elif classnames is None:
            raise ConfigError(
                f"{path}: column {label_key!r} is {type(feature).__name__}, not a ClassLabel; "
                "pass class names (--classnames FILE) for its integer labels"
            )
        else:
            base = None
        if classnames is None:
            names = base
        elif isinstance(classnames, Mapping):
            if base is None:
                raise ConfigError(f"{path}: a class-name mapping needs a ClassLabel column to map from")
            missing = [b for b in base if b not in classnames]
            if missing:
                raise ConfigError(f"{path}: ClassLabel name {missing[0]!r} has no entry in the class-name mapping")
            names = [classnames[b] for b in base]
        else:
            names = list(classnames)
            if base is not None and len(names) != len(base):
                raise ConfigError(
                    f"class-name count mismatch: {len(names)} class names given but the ClassLabel "
                    f"column {label_key!r} of {path} has {len(base)} classes"
                )
        self.path, self.split, self.image_key, self.label_key = path, split, image_key, label_key
        self.name = name or Path(path).name
        self.families = {self.name: names}
        self._ds = ds.cast_column(image_key, datasets.Image(decode=False))
        self._labels = [int(v) for v in ds[label_key]]
        bad = [v for v in self._labels if not 0 <= v < len(names)]
        if bad:
            raise ConfigError(f"class-name count mismatch: {path} has label {bad[0]} but {len(names)} class names")

    def __len__(self) -> int:
        return len(self._labels)

    def _load(self, i: int) -> Image.Image:
        value = self._ds[i][self.image_key]
        if value.get("bytes"):
            return _open_rgb(value["bytes"])
        return _open_rgb(value["path"])

    def records(self) -> Iterator[Record]:
        for i, label in enumerate(self._labels):
            yield Record(str(i), lambda i=i: self._load(i), {self.name: label})

    def describe(self) -> dict[str, Any]:
        return {
            "type": "hf_dataset",
            "name": self.name,
            "path": self.path,
            "split": self.split,
            "image_key": self.image_key,
            "label_key": self.label_key,
            "num_images": len(self),
        }
