"""
data.py: the datasets, one entry point: `load_dataset(name, split, root=..., classes=..., shots=..., limit=...)`.

  * readers for the official layouts of CUB-200-2011, Oxford Flowers102, Oxford-IIIT Pets, Stanford Cars,
    FGVC-Aircraft, Stanford Dogs and Food-101, and for a JSON / JSONL file of your own (LAYOUTS shows each layout);
  * the synthetic toy set (colour x pattern x shape, drawn once into the cache) that the tests and quickstarts use;
  * CoOp's base / novel class halves, seeded k-shot draws, class hierarchies and synonyms for the judges;
  * load-time image checks: a missing, empty, truncated, non-image or extreme-aspect file is dropped with one warning.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import operator
import os
import random
import re
import shutil
import sys
import unicodedata
from collections import Counter
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

import common

# ----- names, records, and the toy dataset -----
def normalize(text: str) -> str:
    """The one key for comparing names (mining, rewards, splits, the rules judge): NFC, lowercase, a possessive "'s"
    dropped, every run of non-letters and non-digits (any script) -> one space, so a hyphen is a space (DiVE-k):
    "Chuck-will's-Widow" -> 'chuck will widow', 'Crème Brûlée' -> 'crème brûlée', 'F-16A/B' -> 'f 16a b'."""
    text = unicodedata.normalize("NFC", text).lower()
    text = re.sub("['\u2019\u02bc]s\\b", "", text)  # ' and the typographic ones a model may write
    return " ".join(re.sub(r"[\W_]+", " ", text).split())

class NameMap(dict):
    """A dict keyed by normalised names: `hierarchy["Black-footed Albatross"]` and `hierarchy["black footed
    albatross"]` are the same entry. Values stay as given (display forms)."""

    def __init__(self, mapping=()):
        super().__init__((normalize(key), value) for key, value in dict(mapping).items())

    def __setitem__(self, key, value):
        super().__setitem__(normalize(key), value)

    def __getitem__(self, key):
        return super().__getitem__(normalize(key))

    def __contains__(self, key):
        return isinstance(key, str) and super().__contains__(normalize(key))

    def get(self, key, default=None):
        return super().get(normalize(key), default) if isinstance(key, str) else default

@dataclasses.dataclass
class Example:
    image: str  # path to the image file
    label: int  # class index into Dataset.class_names
    class_name: str  # the clean class name ("Black footed Albatross")
    id: str = ""  # a stable identifier (relative path), used for caching and logs

@dataclasses.dataclass
class Dataset:
    name: str
    examples: list[Example]
    class_names: list[str]  # every class of the dataset, in class-id order
    kind: str  # what the objects are ("bird", "aircraft", "shape"), used in prompts
    hierarchy: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # name -> ancestors, nearest first
    synonyms: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # normalised name -> other names
    classes: list[int] | None = None  # the class ids this split was restricted to (None = all)
    generic: list[str] = dataclasses.field(default_factory=list)  # broad words that are 'generic' for any class
    split: str = ""  # train / val / test / trainval
    root: str | None = None  # the --data-root (or the JSON file) it was read from
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)  # images dropped at load time, by reason

    def __len__(self):
        return len(self.examples)

    @property
    def split_class_names(self) -> list[str]:
        return list(self.class_names) if self.classes is None else [self.class_names[i] for i in self.classes]

TOY_COLOURS = {"red": (205, 40, 40), "green": (40, 160, 60), "blue": (45, 70, 210), "yellow": (225, 200, 40)}
TOY_SHAPES = ["circle", "square", "triangle"]
TOY_IMAGE_SIZE = 112  # 8 x 8 patches of 14 px -> 16 visual tokens after the 2x2 merge
TOY_SPLITS = {"train": (20, 1), "val": (5, 2), "test": (15, 3)}  # images per class, seed
TOY_FILE = "{split}/{name}_{i:03d}.png"  # under toy_root(); the name with '_' for ' '

def toy_class_names() -> list[str]:
    """24 classes = colour x pattern x shape, in a fixed shuffled order so that the CoOp base / novel halves
    (first 12 / last 12 ids) each mix every colour, pattern and shape."""
    names = [f"{c} {p} {s}" for c in TOY_COLOURS for p in ("plain", "striped") for s in TOY_SHAPES]
    random.Random(0).shuffle(names)
    return names

def draw_toy_image(name: str, rng: random.Random) -> Image.Image:
    """One toy image: a large, roughly centred shape of the class colour, plain or white-striped, on a light tinted
    background with pixel noise; large and centred so that a two-block vision tower tells shapes by the patches."""
    colour, pattern, shape = name.split()
    s = TOY_IMAGE_SIZE
    img = Image.new("RGB", (s, s), tuple(rng.randint(215, 250) for _ in range(3)))  # a light tinted background
    fill = tuple(min(255, max(0, v + rng.randint(-25, 25))) for v in TOY_COLOURS[colour])
    half = rng.randint(36, 46)
    cx, cy = s // 2 + rng.randint(-5, 5), s // 2 + rng.randint(-5, 5)
    mask = Image.new("L", (s, s), 0)
    draw = ImageDraw.Draw(mask)
    if shape == "triangle":
        draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=255)
    else:
        (draw.ellipse if shape == "circle" else draw.rectangle)([cx - half, cy - half, cx + half, cy + half], fill=255)
    layer = Image.new("RGB", (s, s), fill)
    if pattern == "striped":
        period = rng.randint(8, 12)
        for y in range(0, s, period):
            ImageDraw.Draw(layer).rectangle([0, y, s, y + period // 2 - 1], fill=(250, 250, 250))
    img.paste(layer, (0, 0), mask)
    noise = np.random.default_rng(rng.randint(0, 2 ** 31)).normal(0, 8, (s, s, 3)).astype(np.int16)
    return Image.fromarray(np.clip(np.asarray(img).astype(np.int16) + noise, 0, 255).astype(np.uint8))

def toy_root() -> str:
    root = os.path.join(common.CACHE_DIR, "toy-v1")
    if os.path.exists(os.path.join(root, "DONE")):
        return root
    tmp = f"{root}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    for split, (per_class, seed) in TOY_SPLITS.items():
        rng = random.Random(seed)
        os.makedirs(os.path.join(tmp, split))
        for name, i in itertools.product(toy_class_names(), range(per_class)):
            path = os.path.join(tmp, TOY_FILE.format(split=split, name=name.replace(" ", "_"), i=i))
            draw_toy_image(name, rng).save(path)
    open(os.path.join(tmp, "DONE"), "w").close()
    try:
        os.rename(tmp, root)  # atomic: a concurrent builder that lost the race just uses the winner's copy
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return root

def load_toy(split: str) -> Dataset:
    """The synthetic toy set: train / val / test (trainval = train + val), hierarchy class -> shape family -> 'shape',
    one synonym per class with colour and pattern swapped ('striped red circle'), for the judges' synonym rule."""
    root, names = toy_root(), toy_class_names()
    labelled = [(os.path.join(root, TOY_FILE.format(split=part, name=name.replace(" ", "_"), i=i)), label)
                for part in (["train", "val"] if split == "trainval" else [split])
                for label, name in enumerate(names) for i in range(TOY_SPLITS[part][0])]
    synonyms = NameMap({n: [" ".join([n.split()[1], n.split()[0], n.split()[2]])] for n in names})
    hierarchy = NameMap({n: [n.split()[-1], "shape"] for n in names})  # the family: the last word, as CUB's groups
    return _dataset("toy", "shape", root, split, labelled, names, hierarchy=hierarchy, synonyms=synonyms)

def coop_base_novel(num_classes: int) -> tuple[list[int], list[int]]:
    """CoOp base-to-novel rule: sorted class ids, base = the first ceil(n/2), novel = the rest."""
    n_base = math.ceil(num_classes / 2)
    return list(range(n_base)), list(range(n_base, num_classes))

def few_shot(ds: Dataset, shots: int, seed: int) -> Dataset:
    rng = random.Random(seed)
    label_of = operator.attrgetter("label")  # each class's images in their order (a stable sort), classes by label
    by_class = [list(group) for _, group in itertools.groupby(sorted(ds.examples, key=label_of), label_of)]
    picked = [e for group in by_class for e in rng.sample(group, min(shots, len(group)))]
    short = sorted(len(group) for group in by_class if len(group) < shots)
    if short:
        common.print0(f"note: --shots {shots}: {len(short)} of {len(by_class)} classes of {ds.name} {ds.split} have "
                      f"fewer images (fewest {short[0]}); all of theirs are used")
    return dataclasses.replace(ds, examples=picked)

# ----- the real datasets, read from their official layouts -----
# Each reader returns one split in index-file order, every class in class-id order, the object kind and a hierarchy;
# the splits are as the papers use them (README: Data).

SPLITS = ("train", "val", "test", "trainval")
COOP_FILES = {  # CoOp's split file of a dataset and the folder its paths are under; preferred when present
    "flowers": ("split_zhou_OxfordFlowers.json", "jpg"), "pets": ("split_zhou_OxfordPets.json", "images"),
    "cars": ("split_zhou_StanfordCars.json", ""), "food": ("split_zhou_Food101.json", "images")}
LAYOUTS = {name: "\n  ".join(lines) for name, lines in {  # what each reader expects, shown with its messages
    "cub": ["CUB_200_2011/", "images/NNN.Class_Name/*.jpg", "images.txt: <image_id> <path under images/>",
            "classes.txt: <class_id> <NNN.Class_Name>", "image_class_labels.txt: <image_id> <class_id>",
            "train_test_split.txt: <image_id> <1 = train, 0 = test>"],
    "flowers": ["oxford_flowers/", "jpg/image_00001.jpg ...",
                'imagelabels.mat (labels 1..102), setid.mat (trnid / valid / tstid), cat_to_name.json ("1".."102")'],
    "pets": ["oxford-iiit-pet/", "images/<Breed>_<n>.jpg (cat breeds capitalised, dog breeds lower case)",
             "annotations/trainval.txt, annotations/test.txt: <stem> <class 1..37> <species 1 = cat, 2 = dog> <breed>"],
    "cars": ["stanford_cars/", "cars_train/00001.jpg ..., cars_test/00001.jpg ...",
             "devkit/cars_meta.mat: class_names (1 x 196)", "devkit/cars_train_annos.mat, "
             "cars_test_annos_withlabels.mat (at the root or in devkit/): annotations with fname, class (1-based)"],
    "aircraft": ["fgvc-aircraft-2013b/data/ (or its parent folder)", "images/<7-digit id>.jpg",
                 "variants.txt: one variant per line; the order defines the labels",
                 "images_variant_{train,val,trainval,test}.txt: <id> <variant>",
                 "optional images_family_*.txt, images_manufacturer_*.txt: variant -> family -> manufacturer"],
    "dogs": ["stanford_dogs/", "Images/<wnid>-<Breed>/<wnid>_<n>.jpg",
             "train_list.mat, test_list.mat: file_list (paths under Images/), labels (1..120)"],
    "food": ["food-101/", "images/<class>/<id>.jpg", "meta/classes.txt: one class folder per line, in label order",
             "optional meta/labels.txt: readable names, same order",
             "meta/train.txt, meta/test.txt: <class>/<id> (no extension)"],
    "json": ["a .json or .jsonl file (use {split} in the path for one file per split, e.g. data/{split}.jsonl):",
             'records {"image": path, "class_name": name, "split": "train"} ("split" optional; paths relative to '
             "--data-root if given, else to the file's folder)",
             '.json may also be an object {"classes": [...], "kind": "bird", "hierarchy": {name: [parent, grandparent, '
             '...]}, "synonyms": {name: [...]}, "train": [records], "val": [...], "test": [...]}',
             'class list: the "classes" key, else classes.txt beside the file (one per line), else the sorted names'],
}.items()}
LAYOUTS.update({name: f'{LAYOUTS[name]}\n  optional {file}: the CoOp split {{"train": [[path in {folder or "."}/, '
                      f'label0, name], ...], "val": .., "test": ..}}, preferred when present'
                for name, (file, folder) in COOP_FILES.items()})
GENERIC_TERMS = {  # broad words that count as a correct but 'generic' answer for every class of the dataset
    "cub": ["bird", "animal"], "flowers": ["flower", "plant", "flowering plant"], "pets": ["pet", "animal"],
    "cars": ["car", "vehicle", "automobile"], "dogs": ["dog", "animal", "canine"], "food": ["food", "dish", "meal"],
    "aircraft": ["aircraft", "airplane", "aeroplane", "plane", "airliner", "jet"], "json": ["object"],
    "toy": ["shape", "object"]}

def _fail(name: str, what: str):
    raise SystemExit(f"--data {name}: {what}.\nExpected layout:\n{LAYOUTS[name]}")

def _root(name: str, root: str | None, marker: str = "", subdirs: Sequence[str] = ()) -> str:
    """--data-root checked; the first of root, root/sub... that holds `marker` (the dataset folder or a parent)."""
    if not root:
        _fail(name, "needs --data-root pointing at the dataset folder")
    if not os.path.isdir(root):
        _fail(name, f"--data-root {root} is not a directory")
    candidates = [root, *(os.path.join(root, sub) for sub in subdirs)]
    return next((path for path in candidates if os.path.exists(os.path.join(path, marker))), root)

def _require(name: str, root: str, *relpaths: str) -> list[str]:
    for rel in relpaths:
        if not os.path.exists(os.path.join(root, rel)):
            _fail(name, f"{rel} not found under --data-root {root}")
    return [os.path.join(root, rel) for rel in relpaths]

def _rows(name: str, path: str, columns: int) -> list[list[str]]:
    rows = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            line = line.strip()
            if line and not line.startswith("#"):
                rows.append(line.split(None, columns - 1))
                if len(rows[-1]) < columns:
                    _fail(name, f"{path} line {i}: expected {columns} columns, got {line!r}")
    return rows

def _int(name: str, path: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        _fail(name, f"{path}: expected an integer, got {value!r}")

def load_mat(name: str, path: str, *keys: str) -> list[np.ndarray]:
    try:
        import scipy.io  # here: only the .mat-based datasets need it
    except ImportError:
        raise SystemExit(f"--data {name}: reading {path} needs scipy (pip install scipy); only the .mat-based "
                         f"datasets (flowers without its CoOp split file, cars without it, dogs) need it")
    try:
        mat = scipy.io.loadmat(path, squeeze_me=True, struct_as_record=True)
    except Exception as e:  # a truncated or non-MATLAB file
        _fail(name, f"cannot read {path} as a MATLAB file ({e})")
    for key in keys:
        if key not in mat:
            _fail(name, f"{path} has no variable {key!r} (it has {sorted(k for k in mat if not k.startswith('__'))})")
    return [np.atleast_1d(mat[key]) for key in keys]

def _mat_strings(values) -> list[str]:
    out = []
    for v in np.atleast_1d(values).ravel():
        while isinstance(v, np.ndarray):  # a MATLAB cell array of strings, however scipy squeezed it
            v = v.ravel()[0] if v.size else ""
        out.append(str(v))
    return out

def _pick_split(split: str, train: list, test: list, val: list | None = None) -> list:
    """train / val / test / trainval from the official (path, label) lists. Without an official val, 20% of each
    class of train (rounded, at least one of two or more) is val, fixed seed: CoOp's `split_trainval`, deterministic."""
    if split == "test":
        return test
    if val is None and split != "trainval":
        rng, val_paths = random.Random(1), set()  # each class in path order: val whatever the index file's order
        for _, group in itertools.groupby(sorted(train, key=lambda pair: (pair[1], pair)), lambda pair: pair[1]):
            group = list(group)
            rng.shuffle(group)
            val_paths.update(path for path, _ in group[:max(1, round(0.2 * len(group))) if len(group) >= 2 else 0])
        train, val = [p for p in train if p[0] not in val_paths], [p for p in train if p[0] in val_paths]
    return {"train": train, "val": val, "trainval": train + (val or [])}[split]

def _coop_split(name: str, root: str, split: str) -> tuple[list, list[str]] | tuple[None, None]:
    file, folder = COOP_FILES[name]
    path = os.path.join(root, file)
    if not os.path.exists(path):
        return None, None
    prefix = _require(name, root, folder)[0] if folder else root
    try:
        with open(path) as f:
            lists = json.load(f)
        names = {int(label): cname for part in ("train", "val", "test") for _, label, cname in lists[part]}
    except (ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"--data {name}: {path} is not a CoOp split file ({e!r}); expected "
                         f'{{"train": [[path, label0, classname], ...], "val": [...], "test": [...]}}')
    wanted = ["train", "val"] if split == "trainval" else [split]
    labelled = [(os.path.join(prefix, rel), int(label)) for part in wanted for rel, label, _ in lists[part]]
    return labelled, [names[i] for i in range(max(names) + 1)] if names else []

def _dataset(name: str, kind: str, root: str, split: str, labelled: list, class_names: list[str], **fields) -> Dataset:
    fields.setdefault("hierarchy", NameMap({n: [kind] for n in class_names}))
    examples = [Example(path, label, class_names[label], os.path.relpath(path, root)) for path, label in labelled]
    return Dataset(name, examples, class_names, kind, generic=GENERIC_TERMS[name], split=split, root=root, **fields)

def read_cub(root: str | None, split: str) -> Dataset:
    """CUB-200-2011. Class name = folder without 'NNN.', '_' -> ' ' ("Black footed Albatross"). test = the official
    test (5,794); train / val = the official train (5,994) split 80/20 per class (DiVE-k); trainval = official train."""
    root = _root("cub", root, "images.txt", ["CUB_200_2011"])
    images_txt, classes_txt, labels_txt, split_txt, images_dir = _require(
        "cub", root, "images.txt", "classes.txt", "image_class_labels.txt", "train_test_split.txt", "images")
    classes = sorted((_int("cub", classes_txt, cid), folder) for cid, folder in _rows("cub", classes_txt, 2))
    class_names = [re.sub(r"^\d+\.", "", folder).replace("_", " ").strip() for _, folder in classes]
    class_index = {cid: i for i, (cid, _) in enumerate(classes)}
    paths, labels, is_train = (dict(_rows("cub", path, 2)) for path in (images_txt, labels_txt, split_txt))
    train, test = [], []
    for iid, rel in paths.items():
        if iid not in labels or iid not in is_train:
            _fail("cub", f"image id {iid} ({rel}) is missing from image_class_labels.txt or train_test_split.txt "
                         f"under {root}")
        cid = _int("cub", labels_txt, labels[iid])
        if cid not in class_index:
            _fail("cub", f"{labels_txt}: class id {cid} is not in classes.txt")
        (train if is_train[iid] == "1" else test).append((os.path.join(images_dir, rel), class_index[cid]))
    # hierarchy: class -> [group noun = the last word (warbler, sparrow, gull ...), 'bird']; one-word names and the
    # nightjars Chuck-will's-widow and Whip-poor-will (their last word is no group noun) -> ['bird']
    hierarchy = NameMap({n: [w[-1], "bird"] if len(w) > 1 and w[-1] not in ("widow", "will") else ["bird"]
                         for n, w in ((n, normalize(n).split()) for n in class_names)})
    synonyms = NameMap({n: [n.replace("Grey", "Gray"), n.replace("Gray", "Grey")] for n in class_names
                        if "Gray" in n or "Grey" in n})
    return _dataset("cub", "bird", root, split, _pick_split(split, train, test), class_names, synonyms=synonyms,
                    hierarchy=hierarchy)

def read_flowers(root: str | None, split: str) -> Dataset:
    """Oxford Flowers102: the CoOp split file when present (train 4,093 / val 1,633 / test 2,463), else the official
    setid.mat (trnid / valid / tstid) with names from cat_to_name.json."""
    root = _root("flowers", root)
    labelled, class_names = _coop_split("flowers", root, split)
    if labelled is None:
        labels_mat, setid_mat, cat_json, jpg = _require("flowers", root, "imagelabels.mat", "setid.mat",
                                                        "cat_to_name.json", "jpg")
        labels = load_mat("flowers", labels_mat, "labels")[0].astype(int)
        train, val, test = ([(os.path.join(jpg, f"image_{int(i):05d}.jpg"), int(labels[int(i) - 1]) - 1) for i in ids]
                            for ids in load_mat("flowers", setid_mat, "trnid", "valid", "tstid"))
        with open(cat_json) as f:
            cat = json.load(f)
        try:
            class_names = [cat[str(i)] for i in range(1, int(labels.max()) + 1)]
        except KeyError as e:
            _fail("flowers", f"{cat_json} has no name for class {e}; expected keys '1'..'102'")
        labelled = _pick_split(split, train, test, val)
    # the dataset's own spelling "barbeton daisy"; DiVE-k maps the correct "barberton" to it
    synonyms = NameMap({n: [n.replace("barbeton", "barberton")] for n in class_names if "barbeton" in n})
    return _dataset("flowers", "flower", root, split, labelled, class_names, synonyms=synonyms)

def read_pets(root: str | None, split: str) -> Dataset:
    """Oxford-IIIT Pets, 37 breeds. The CoOp split file when present (2,944 / 736 / 3,669), else trainval.txt split
    80/20 per class and test.txt. Hierarchy: breed -> cat / dog (species column, else the file-name case)."""
    root = _root("pets", root)
    labelled, class_names = _coop_split("pets", root, split)
    species: dict[str, str] = {}
    if labelled is not None:
        class_names = [n.replace("_", " ").lower() for n in class_names]
        for path, label in labelled:
            species.setdefault(class_names[label], "cat" if os.path.basename(path)[:1].isupper() else "dog")
    else:
        trainval_txt, test_txt, images = _require("pets", root, "annotations/trainval.txt", "annotations/test.txt",
                                                  "images")
        names_by_id: dict[int, str] = {}

        def read(path):
            out = []
            for row in _rows("pets", path, 4):
                stem, cid, sp = row[0], _int("pets", path, row[1]), row[2].split()[0]
                name = stem.rsplit("_", 1)[0].replace("_", " ").lower()  # 'Abyssinian_100' -> CoOp's 'abyssinian'
                names_by_id[cid], species[name] = name, "cat" if sp == "1" else "dog"
                out.append((os.path.join(images, stem + ".jpg"), cid - 1))
            return out
        labelled = _pick_split(split, read(trainval_txt), read(test_txt))
        class_names = [names_by_id[i] for i in range(1, max(names_by_id) + 1)]
    return _dataset("pets", "pet", root, split, labelled, class_names,
                    hierarchy=NameMap({n: [species.get(n, "pet")] for n in class_names}))

CAR_MAKES_TWO_WORDS = ("AM General", "Aston Martin", "Land Rover")
CAR_BODY_TYPES = ("Crew Cab", "Extended Cab", "Regular Cab", "Club Cab", "Quad Cab", "SuperCab", "Cab", "Sedan",
                  "Coupe", "Convertible", "SUV", "Hatchback", "Wagon", "Minivan", "Cargo Van", "Van", "Type-S",
                  "Roadster")  # longest first where it matters ("Crew Cab" before "Cab")
YEAR = re.compile(r"(19|20)\d\d")

def car_hierarchy(name: str) -> list[str]:
    """'2012 Audi TTS Coupe' -> ['Audi TTS Coupe', 'Audi TTS', 'Audi', 'car']: model line without the year, without
    the body type, the make, then 'car' (entries equal to the previous one dropped)."""
    words = name.split()
    words = words[1:] if words and YEAR.fullmatch(words[0]) else words
    line = " ".join(words)
    body = next((b for b in CAR_BODY_TYPES if line.endswith(" " + b)), None)
    make = next((m for m in CAR_MAKES_TWO_WORDS if line.startswith(m + " ")), words[0] if words else line)
    chain = [line, line[: -len(body) - 1] if body else line, make, "car"]
    return [a for i, a in enumerate(chain) if normalize(a) not in {normalize(b) for b in [name, *chain[:i]]}]

def read_cars(root: str | None, split: str) -> Dataset:
    """Stanford Cars, 196 classes. The CoOp split file when present (6,509 / 1,635 / 8,041), else the devkit .mat
    files (official train 8,144 split 80/20 per class; test 8,041). Names 'YEAR Make Model Type' (CoOp)."""
    root = _root("cars", root)
    labelled, class_names = _coop_split("cars", root, split)
    if labelled is None:
        meta_path, train_path, _, _ = _require("cars", root, "devkit/cars_meta.mat", "devkit/cars_train_annos.mat",
                                               "cars_train", "cars_test")
        (test_path,) = _require("cars", _root("cars", root, "cars_test_annos_withlabels.mat", ["devkit"]),
                                "cars_test_annos_withlabels.mat")
        names = [n.split() for n in _mat_strings(load_mat("cars", meta_path, "class_names")[0])]
        # 'Audi TTS Coupe 2012' -> CoOp's '2012 Audi TTS Coupe' (the trailing year moved to the front)
        class_names = [" ".join(w[-1:] + w[:-1] if w and YEAR.fullmatch(w[-1]) else w) for w in names]

        def read(path, folder):
            (annos,) = load_mat("cars", path, "annotations")
            if annos.dtype.names is None or not {"fname", "class"} <= set(annos.dtype.names):
                _fail("cars", f"{path}: 'annotations' must be a struct array with fields fname and class")
            return [(os.path.join(root, folder, str(f)), int(c) - 1)
                    for f, c in zip(_mat_strings(annos["fname"]), np.atleast_1d(annos["class"]).ravel())]
        labelled = _pick_split(split, read(train_path, "cars_train"), read(test_path, "cars_test"))
    synonyms = NameMap({n: [" ".join(n.split()[1:] + n.split()[:1])] for n in class_names
                        if n.split() and YEAR.fullmatch(n.split()[0])})  # the devkit's order "Audi TTS Coupe 2012"
    return _dataset("cars", "car", root, split, labelled, class_names, synonyms=synonyms,
                    hierarchy=NameMap({n: car_hierarchy(n) for n in class_names}))

def read_aircraft(root: str | None, split: str) -> Dataset:
    """FGVC-Aircraft 2013b, 100 variants (variants.txt order), the official train / val / test / trainval files;
    hierarchy variant -> family -> manufacturer -> 'aircraft' from the family / manufacturer files when present."""
    root = _root("aircraft", root, "variants.txt", ["data", "fgvc-aircraft-2013b/data"])
    variants_txt, images = _require("aircraft", root, "variants.txt", "images")
    class_names = [variant for (variant,) in _rows("aircraft", variants_txt, 1)]
    index = {n: i for i, n in enumerate(class_names)}
    (split_txt,) = _require("aircraft", root, f"images_variant_{split}.txt")
    labelled = []
    for iid, variant in _rows("aircraft", split_txt, 2):
        if variant not in index:
            _fail("aircraft", f"{split_txt}: variant {variant!r} is not in variants.txt")
        labelled.append((os.path.join(images, iid + ".jpg"), index[variant]))
    parents: dict[str, list[str]] = {}  # variant -> [family, manufacturer] from any split's files
    for part in SPLITS:
        paths = [os.path.join(root, f"images_{level}_{part}.txt") for level in ("variant", "family", "manufacturer")]
        if all(os.path.exists(p) for p in paths):
            variant, family, maker = (dict(_rows("aircraft", p, 2)) for p in paths)
            for iid, v in variant.items():
                if iid in family and iid in maker:
                    parents.setdefault(v, [family[iid], maker[iid]])
    hierarchy, synonyms = NameMap(), NameMap()
    for v in class_names:
        chain = [a for a in parents.get(v, []) if normalize(a) != normalize(v)] + ["aircraft"]
        hierarchy[v] = [a for i, a in enumerate(chain) if normalize(a) not in {normalize(b) for b in chain[:i]}]
        family, maker = parents.get(v, [None, None])
        if maker and not normalize(v).startswith(normalize(maker)):  # "Boeing 707-320" for "707-320"
            synonyms[v] = [f"{maker} {v}"]
            if not normalize(family).startswith(normalize(maker)):  # "Airbus A340" for the family "A340"
                synonyms[family] = [f"{maker} {family}"]
    return _dataset("aircraft", "aircraft", root, split, labelled, class_names, hierarchy=hierarchy, synonyms=synonyms)

def read_dogs(root: str | None, split: str) -> Dataset:
    """Stanford Dogs, 120 breeds: official train 12,000 (val carved 20% per class) / test 8,580 from
    train_list.mat / test_list.mat. Class name = folder without the WordNet id, '_' -> ' '."""
    root = _root("dogs", root)
    train_mat, test_mat, images = _require("dogs", root, "train_list.mat", "test_list.mat", "Images")
    folders: dict[int, str] = {}

    def read(path):
        files, labels = load_mat("dogs", path, "file_list", "labels")
        files, labels = _mat_strings(files), labels.astype(int).ravel()
        if len(files) != len(labels):
            _fail("dogs", f"{path}: file_list and labels differ in length")
        for f, lab in zip(files, labels):
            folders.setdefault(int(lab), f.split("/")[0])
        return [(os.path.join(images, f), int(lab) - 1) for f, lab in zip(files, labels)]
    labelled = _pick_split(split, read(train_mat), read(test_mat))
    if sorted(folders) != list(range(1, len(folders) + 1)):
        _fail("dogs", f"labels in {train_mat} / {test_mat} must run 1..N without gaps")
    class_names = [folders[i].split("-", 1)[-1].replace("_", " ") for i in range(1, len(folders) + 1)]
    return _dataset("dogs", "dog", root, split, labelled, class_names)

def read_food(root: str | None, split: str) -> Dataset:
    """Food-101: the CoOp split file when present, else meta/train.txt (val carved 20% per class) / meta/test.txt.
    Class names from meta/labels.txt, else the folder names with '_' -> ' '."""
    root = _root("food", root, "meta/classes.txt", ["food-101"])
    classes_txt, images = _require("food", root, "meta/classes.txt", "images")
    folders = [folder for (folder,) in _rows("food", classes_txt, 1)]
    labels_txt = os.path.join(root, "meta", "labels.txt")
    readable = [name for (name,) in _rows("food", labels_txt, 1)] if os.path.exists(labels_txt) else []
    class_names = readable if len(readable) == len(folders) else [n.replace("_", " ") for n in folders]
    labelled, _ = _coop_split("food", root, split)
    if labelled is None:
        index = {n: i for i, n in enumerate(folders)}
        train_txt, test_txt = _require("food", root, "meta/train.txt", "meta/test.txt")

        def read(path):
            out = []
            for (rel,) in _rows("food", path, 1):
                folder = rel.split("/")[0]
                if folder not in index:
                    _fail("food", f"{path}: class folder {folder!r} is not in meta/classes.txt")
                out.append((os.path.join(images, rel + ".jpg"), index[folder]))
            return out
        labelled = _pick_split(split, read(train_txt), read(test_txt))
    return _dataset("food", "food", root, split, labelled, class_names)

def read_json(path: str, split: str, root: str | None = None) -> Dataset:
    """A user's own data: a .json / .jsonl file of {image, class_name[, split]} records and a class list
    (LAYOUTS['json']). `{split}` in the path selects one file per split; a record without a split is in every split."""
    path = path.replace("{split}", split)
    expected = f"\nExpected:\n{LAYOUTS['json']}"
    if not os.path.exists(path):
        raise SystemExit(f"--data {path}: file not found.{expected}")
    meta: dict = {}
    try:
        with open(path) as f:
            if path.endswith(".jsonl"):
                records = []
                for number, line in enumerate(f, 1):  # line numbers as an editor shows them, blank lines counted
                    try:
                        records += [json.loads(line)] if line.strip() else []
                    except ValueError as e:
                        raise SystemExit(f"--data {path}: line {number} is not valid JSON ({e.msg}); expected one "
                                         f"{{\"image\": path, \"class_name\": name}} record per line") from None
            else:
                records = json.load(f)
                if isinstance(records, dict):
                    meta = records
                    records = [dict(r, split=part) for part in SPLITS[:3] for r in meta.get(part, [])]
                    records += meta.get("records", [])
    except ValueError as e:
        raise SystemExit(f"--data {path}: not valid JSON ({e}).{expected}")
    for i, r in enumerate(records):
        if (not isinstance(r, dict) or not isinstance(r.get("image"), str) or not isinstance(r.get("class_name"), str)
                or not isinstance(r.get("split", ""), (str, type(None)))):
            raise SystemExit(f"--data {path}: record {i + 1} is {r!r}; expected {{\"image\": path, \"class_name\": "
                             f"name}} with text values (and an optional \"split\" name).{expected}")
    classes_txt = os.path.join(os.path.dirname(path), "classes.txt")
    class_names = (list(meta["classes"]) if "classes" in meta else
                   [name for (name,) in _rows("json", classes_txt, 1)] if os.path.exists(classes_txt) else
                   sorted({r["class_name"] for r in records}))
    index = {normalize(n): i for i, n in enumerate(class_names)}
    base = root or os.path.dirname(os.path.abspath(path))
    wanted = {"train", "val"} if split == "trainval" else {split}
    in_split = [(i, r) for i, r in enumerate(records) if r.get("split") is None or r["split"] in wanted]
    examples, first_seen = [], {}
    for i, r in in_split:
        label = index.get(normalize(r["class_name"]))
        if label is None:
            raise SystemExit(f"--data {path}: record {i + 1} has class_name {r['class_name']!r}, which is not in the "
                             f"class list ({'the classes key' if 'classes' in meta else classes_txt})")
        image = r["image"] if os.path.isabs(r["image"]) else os.path.join(base, r["image"])
        j, other = first_seen.setdefault(image, (i + 1, label))
        if other != label:  # an exact repeat is dropped; one image under two classes cannot be scored
            raise SystemExit(f"--data {path}: records {j} and {i + 1} give the image {r['image']!r} two classes "
                             f"({class_names[other]!r}, {class_names[label]!r}); expected one class per image")
        if j == i + 1:
            examples.append(Example(image, label, class_names[label], r.get("id", r["image"])))
    if len(in_split) > len(examples):
        common.print0(f"note: --data {path}: {len(in_split) - len(examples)} records repeat an earlier record's "
                      f"image and class; each image is used once")
    if not examples and any(str(r.get("split")).lower() in wanted for r in records):  # "Test" for "test"
        present = sorted({str(r.get("split")) for r in records if r.get("split") is not None})
        raise SystemExit(f"--data {path}: no record of split {split!r}; the file's splits are {present} (split names "
                         f"are lowercase: {', '.join(SPLITS[:3])})")
    kind = meta.get("kind", "object")
    hierarchy = NameMap({n: list(chain) for n, chain in meta.get("hierarchy", {}).items()})  # name -> ancestors
    for n in class_names:  # every class ends its chain with the kind, the 'generic' answer
        chain = hierarchy.get(n, [])
        hierarchy[n] = chain if chain and normalize(chain[-1]) == normalize(kind) else chain + [kind]
    return Dataset(os.path.basename(path), examples, class_names, kind, split=split, root=base, hierarchy=hierarchy,
                   synonyms=NameMap(meta.get("synonyms", {})), generic=[kind, *GENERIC_TERMS["json"]])

READERS = {"cub": read_cub, "flowers": read_flowers, "pets": read_pets, "cars": read_cars, "aircraft": read_aircraft,
           "dogs": read_dogs, "food": read_food}
MAX_ASPECT = 200  # Qwen2.5-VL's image processor refuses images whose long side is over 200 times the short one

def probe_image(path: str) -> str | None:
    """None if the file looks like a whole image, else why not: 'missing', 'empty', 'not an image', 'truncated',
    'aspect ratio over 200'. Cheap: a JPEG must end with its end marker, a PNG with IEND, in the last KB (else, as
    trailing bytes happen, the image is decoded to decide)."""
    try:
        size = os.path.getsize(path)
    except OSError:
        return "missing"
    if size == 0:
        return "empty"
    try:
        with Image.open(path) as im, open(path, "rb") as f:
            if max(im.size) > MAX_ASPECT * min(im.size):
                return f"aspect ratio over {MAX_ASPECT}"
            marker = {"JPEG": b"\xff\xd9", "PNG": b"IEND"}.get(im.format)
            f.seek(max(0, size - 1024))
            if marker is not None and marker not in f.read():
                im.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        return "truncated" if "truncated" in str(e).lower() else "not an image"
    return None

def load_dataset(name: str, split: str, *, root: str | None = None, classes: str = "all", shots: int | None = None,
                 limit: int | None = None, seed: int = 0) -> Dataset:
    """One split of `name` (toy, cub, flowers, pets, cars, aircraft, dogs, food, or a .json / .jsonl file), maybe
    restricted to base / novel classes, k shots per class and a limit. Unreadable images are dropped here (warned,
    counted in `.skipped`), before the few-shot draw, so an epoch never meets a broken file."""
    if split not in SPLITS:
        raise SystemExit(f"--data {name}: unknown split {split!r} (choose from {', '.join(SPLITS)})")
    if name == "toy":
        if root is not None:
            raise SystemExit(f"--data-root {root}: --data toy is generated by this project and reads no folder; "
                             f"leave --data-root out (or name a dataset that lives there)")
        ds = load_toy(split)
    elif name in READERS:
        ds = READERS[name](root, split)
    elif name.endswith((".json", ".jsonl")):
        ds = read_json(name, split, root)
    else:
        raise SystemExit(f"--data {name}: unknown dataset (known: toy, {', '.join(READERS)}, or a .json / .jsonl "
                         f"file of {{image, class_name}} records)")
    if classes not in ("all", "base", "novel"):
        raise SystemExit(f"--classes {classes}: expected all, base or novel")
    if classes != "all":  # labels keep their global ids
        base, novel = coop_base_novel(len(ds.class_names))
        kept = set(base if classes == "base" else novel)
        ds = dataclasses.replace(ds, examples=[e for e in ds.examples if e.label in kept], classes=sorted(kept))
    probed = [] if name == "toy" else [(ex.image, probe_image(ex.image)) for ex in ds.examples]
    bad = [(image, reason) for image, reason in probed if reason is not None]
    if bad:  # counted in .skipped and common.IMAGE_PROBLEMS (toy images are written by this file and never broken)
        skipped = Counter(reason for _, reason in bad)
        common.IMAGE_PROBLEMS.update(skipped)
        shown = "; ".join(f"{p} ({r})" for p, r in bad[:3]) + (" ..." if len(bad) > 3 else "")
        common.print0(f"warning: --data {ds.name} {ds.split}: skipped {len(bad)} of {len(ds.examples)} images "
                      f"({dict(skipped)}): {shown}", file=sys.stderr)
        bad_paths = {p for p, _ in bad}
        ds = dataclasses.replace(ds, examples=[ex for ex in ds.examples if ex.image not in bad_paths],
                                 skipped={**ds.skipped, **skipped})
    if not ds.examples:  # an empty index file, a split or class half with no image, or every image unreadable
        dropped = (f", after dropping {sum(ds.skipped.values())} unreadable images {dict(ds.skipped)}"
                   if ds.skipped else "")
        raise SystemExit(f"--data {name}: split {split!r} ({classes} classes) has no usable image (read from "
                         f"{ds.root}{dropped}). Expected at least one readable image.\nExpected layout:\n"
                         f"{LAYOUTS.get(name, LAYOUTS['json'])}")
    if shots:
        ds = few_shot(ds, shots, seed)
    if limit:
        ds = dataclasses.replace(ds, examples=random.Random(seed).sample(ds.examples, min(limit, len(ds.examples))))
    return ds
