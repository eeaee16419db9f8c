"""Tiny fake dataset trees in the official on-disk layouts (real file formats: JPEG images, the index text files,
MATLAB .mat files via scipy, CoOp split JSON), for the reader, judge and eval tests. Each builder returns the root
and what a correct reader must report."""
import json
import os

import numpy as np
from PIL import Image


def jpg(path, seed=0, size=16):
    """A small real JPEG (random colour, so images differ)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 255, 3)
    Image.new("RGB", (size, size), tuple(int(v) for v in rgb)).save(path, "JPEG")


def truncate(path):
    """Cut a JPEG in half (a typical broken download)."""
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


def not_an_image(path):
    with open(path, "w") as f:
        f.write("<html>404 not found</html>")


def write(path, lines):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.writelines(line + "\n" for line in lines)


def savemat(path, data):
    import scipy.io
    os.makedirs(os.path.dirname(path), exist_ok=True)
    scipy.io.savemat(path, data)


def cell(strings):
    """A MATLAB cell array (column) of strings."""
    return np.array([[s] for s in strings], dtype=object)


CUB_FOLDERS = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Yellow_Warbler", "004.Chuck_will_Widow",
               "005.Gray_Catbird"]


def make_cub(root, train_per_class=5, test_per_class=3):
    """CUB_200_2011/ under root with 5 classes; returns the dataset folder."""
    base = os.path.join(root, "CUB_200_2011")
    images, classes, labels, split = [], [], [], []
    iid = 0
    for cid, folder in enumerate(CUB_FOLDERS, 1):
        classes.append(f"{cid} {folder}")
        for k in range(train_per_class + test_per_class):
            iid += 1
            rel = f"{folder}/{folder.split('.')[1]}_{k:04d}_{iid}.jpg"
            jpg(os.path.join(base, "images", rel), seed=iid)
            images.append(f"{iid} {rel}")
            labels.append(f"{iid} {cid}")
            split.append(f"{iid} {1 if k < train_per_class else 0}")
    write(os.path.join(base, "images.txt"), images)
    write(os.path.join(base, "classes.txt"), classes)
    write(os.path.join(base, "image_class_labels.txt"), labels)
    write(os.path.join(base, "train_test_split.txt"), split)
    return base


FLOWER_NAMES = ["pink primrose", "barbeton daisy", "sword lily", "rose"]


def make_flowers(root, coop=False):
    """12 images, 3 per class, one per class in each split: through setid.mat (with imagelabels.mat and
    cat_to_name.json), or through a CoOp split file only."""
    labels = []
    for i in range(12):
        jpg(os.path.join(root, "jpg", f"image_{i + 1:05d}.jpg"), seed=i)
        labels.append(i % 4 + 1)
    if coop:
        split = {"train": [], "val": [], "test": []}
        for i, lab in enumerate(labels):
            part = "train" if i < 4 else "val" if i < 8 else "test"
            split[part].append([f"image_{i + 1:05d}.jpg", lab - 1, FLOWER_NAMES[lab - 1]])
        with open(os.path.join(root, "split_zhou_OxfordFlowers.json"), "w") as f:
            json.dump(split, f)
    else:
        savemat(os.path.join(root, "imagelabels.mat"), {"labels": np.array([labels])})
        savemat(os.path.join(root, "setid.mat"), {"trnid": np.array([[1, 2, 3, 4]]), "valid": np.array([[5, 6, 7, 8]]),
                                                  "tstid": np.array([[9, 10, 11, 12]])})
        with open(os.path.join(root, "cat_to_name.json"), "w") as f:
            json.dump({str(i + 1): n for i, n in enumerate(FLOWER_NAMES)}, f)
    return root


PET_BREEDS = [("Abyssinian", 1), ("american_bulldog", 2), ("Bengal", 1), ("beagle", 2)]  # (file stem, species)


def make_pets(root, trainval_per_class=5, test_per_class=2, coop=False):
    trainval, test = [], []
    for cid, (breed, species) in enumerate(PET_BREEDS, 1):
        for k in range(trainval_per_class + test_per_class):
            stem = f"{breed}_{k + 1}"
            jpg(os.path.join(root, "images", stem + ".jpg"), seed=cid * 100 + k)
            (trainval if k < trainval_per_class else test).append(f"{stem} {cid} {species} {k + 1}")
    write(os.path.join(root, "annotations", "trainval.txt"), trainval)
    write(os.path.join(root, "annotations", "test.txt"), test)
    if coop:  # CoOp: train / val / test lists, paths under images/, lower-case names with underscores
        split = {"train": [], "val": [], "test": []}
        for part, lines in (("train", trainval[::2]), ("val", trainval[1::2]), ("test", test)):
            for line in lines:
                stem, cid = line.split()[:2]
                split[part].append([stem + ".jpg", int(cid) - 1, PET_BREEDS[int(cid) - 1][0].lower()])
        with open(os.path.join(root, "split_zhou_OxfordPets.json"), "w") as f:
            json.dump(split, f)
    return root


CAR_META = ["AM General Hummer SUV 2000", "Audi TTS Coupe 2012", "Audi TT Hatchback 2011",
            "Chevrolet Silverado 1500 Crew Cab 2012"]


def _annos(fnames, classes):
    ann = np.zeros((1, len(fnames)), dtype=[("bbox_x1", "O"), ("bbox_y1", "O"), ("bbox_x2", "O"), ("bbox_y2", "O"),
                                            ("class", "O"), ("fname", "O")])
    for i, (f, c) in enumerate(zip(fnames, classes)):
        ann[0, i] = (np.array([[1]]), np.array([[1]]), np.array([[10]]), np.array([[10]]),
                     np.array([[c]], dtype=np.uint8), f)
    return ann


def make_cars(root, train_per_class=5, test_per_class=2):
    train_f, train_c, test_f, test_c = [], [], [], []
    n = 0
    for c in range(1, len(CAR_META) + 1):
        for k in range(train_per_class + test_per_class):
            n += 1
            f = f"{n:05d}.jpg"
            if k < train_per_class:
                jpg(os.path.join(root, "cars_train", f), seed=n)
                train_f.append(f)
                train_c.append(c)
            else:
                jpg(os.path.join(root, "cars_test", f), seed=n)
                test_f.append(f)
                test_c.append(c)
    savemat(os.path.join(root, "devkit", "cars_meta.mat"),
            {"class_names": np.array(CAR_META, dtype=object).reshape(1, -1)})
    savemat(os.path.join(root, "devkit", "cars_train_annos.mat"), {"annotations": _annos(train_f, train_c)})
    savemat(os.path.join(root, "cars_test_annos_withlabels.mat"), {"annotations": _annos(test_f, test_c)})
    return root


AIRCRAFT = [("707-320", "Boeing 707", "Boeing"), ("A340-600", "A340", "Airbus"), ("Cessna 172", "Cessna 172", "Cessna"),
            ("DC-10", "DC-10", "McDonnell Douglas")]


def make_aircraft(root, per_split=2):
    """fgvc-aircraft-2013b/data/ under root: per_split images per class in each of train / val / test."""
    data = os.path.join(root, "fgvc-aircraft-2013b", "data")
    write(os.path.join(data, "variants.txt"), [v for v, _, _ in AIRCRAFT])
    n = 1000000
    rows = {part: {"variant": [], "family": [], "manufacturer": []} for part in ("train", "val", "test")}
    for part in ("train", "val", "test"):
        for v, fam, maker in AIRCRAFT:
            for _ in range(per_split):
                n += 1
                jpg(os.path.join(data, "images", f"{n}.jpg"), seed=n)
                rows[part]["variant"].append(f"{n} {v}")
                rows[part]["family"].append(f"{n} {fam}")
                rows[part]["manufacturer"].append(f"{n} {maker}")
    for level in ("variant", "family", "manufacturer"):
        for part in ("train", "val", "test"):
            write(os.path.join(data, f"images_{level}_{part}.txt"), rows[part][level])
        write(os.path.join(data, f"images_{level}_trainval.txt"), rows["train"][level] + rows["val"][level])
    return root


DOG_FOLDERS = ["n02085620-Chihuahua", "n02085782-Japanese_spaniel", "n02085936-Maltese_dog"]


def make_dogs(root, train_per_class=5, test_per_class=2):
    lists = {"train": ([], []), "test": ([], [])}
    for label, folder in enumerate(DOG_FOLDERS, 1):
        wnid = folder.split("-")[0]
        for k in range(train_per_class + test_per_class):
            rel = f"{folder}/{wnid}_{k}.jpg"
            jpg(os.path.join(root, "Images", rel), seed=label * 100 + k)
            files, labels = lists["train" if k < train_per_class else "test"]
            files.append(rel)
            labels.append(label)
    for part, (files, labels) in lists.items():
        savemat(os.path.join(root, f"{part}_list.mat"),
                {"file_list": cell(files), "annotation_list": cell([f[:-4] for f in files]),
                 "labels": np.array(labels).reshape(-1, 1)})
    return root


FOOD = [("apple_pie", "Apple pie"), ("fish_and_chips", "Fish and chips"), ("pho", "Pho")]


def make_food(root, train_per_class=5, test_per_class=2):
    base = os.path.join(root, "food-101")
    train, test = [], []
    for c, (folder, _) in enumerate(FOOD):
        for k in range(train_per_class + test_per_class):
            jpg(os.path.join(base, "images", folder, f"{k}.jpg"), seed=c * 100 + k)
            (train if k < train_per_class else test).append(f"{folder}/{k}")
    write(os.path.join(base, "meta", "classes.txt"), [f for f, _ in FOOD])
    write(os.path.join(base, "meta", "labels.txt"), [n for _, n in FOOD])
    write(os.path.join(base, "meta", "train.txt"), train)
    write(os.path.join(base, "meta", "test.txt"), test)
    return base
