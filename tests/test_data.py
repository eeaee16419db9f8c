"""Dataset readers on tiny fake trees in the official layouts: counts, clean class names, splits, hierarchies; broken
trees give one clear message; broken images are skipped and counted; CoOp base / novel counts."""
import json
import os
import shutil
import sys
from collections import Counter

import pytest

import common
import data
import fake_datasets as fake

try:
    import scipy.io  # noqa: F401
    HAVE_SCIPY = True
except ImportError:
    HAVE_SCIPY = False
needs_scipy = pytest.mark.skipif(not HAVE_SCIPY, reason="scipy is not installed: the .mat-based layouts (flowers "
                                 "official split, cars devkit, dogs) cannot be written or read")


def names(ds):
    return sorted({e.class_name for e in ds.examples})


def test_coop_base_novel_counts():
    # CUB, Flowers, Pets, Cars, Aircraft (the papers' base-to-novel table), then Food and Dogs
    for n, (b, v) in {200: (100, 100), 102: (51, 51), 37: (19, 18), 196: (98, 98), 100: (50, 50), 101: (51, 50),
                      120: (60, 60)}.items():
        base, novel = data.coop_base_novel(n)
        assert (len(base), len(novel)) == (b, v)
        assert base == list(range(b)) and novel == list(range(b, n))  # sorted ids, base first


def test_cub(tmp_path):
    root = fake.make_cub(str(tmp_path))
    counts = {s: len(data.load_dataset("cub", s, root=str(tmp_path))) for s in data.SPLITS}
    # 5 classes x (5 train + 3 test); val = round(0.2 * 5) = 1 per class carved from train
    assert counts == {"train": 20, "val": 5, "test": 15, "trainval": 25}
    ds = data.load_dataset("cub", "train", root=root)  # the dataset folder itself works too
    assert ds.class_names == ["Black footed Albatross", "Laysan Albatross", "Yellow Warbler", "Chuck will Widow",
                              "Gray Catbird"]
    assert ds.kind == "bird" and ds.split == "train"
    assert all(os.path.exists(e.image) and ds.class_names[e.label] == e.class_name for e in ds.examples)
    val = data.load_dataset("cub", "val", root=root)
    assert not {e.image for e in ds.examples} & {e.image for e in val.examples}  # disjoint, and stable:
    assert [e.image for e in val.examples] == [e.image for e in data.load_dataset("cub", "val", root=root).examples]
    assert ds.hierarchy["Yellow Warbler"] == ["warbler", "bird"]
    assert ds.hierarchy["laysan albatross"] == ["albatross", "bird"]  # keys are normalised on lookup
    assert ds.hierarchy["Chuck-will's-Widow"] == ["bird"]  # a nightjar, not a 'widow'
    assert "Grey Catbird" in ds.synonyms["Gray Catbird"]
    base = data.load_dataset("cub", "test", root=root, classes="base")
    novel = data.load_dataset("cub", "test", root=root, classes="novel")
    assert names(base) == sorted(ds.class_names[:3]) and names(novel) == sorted(ds.class_names[3:])
    assert base.split_class_names == ds.class_names[:3] and len(base) == 9 and len(novel) == 6
    assert sorted(e.label for e in novel.examples)[0] == 3  # labels keep their global ids
    shots = data.load_dataset("cub", "train", root=root, shots=2, seed=3)
    assert len(shots) == 10 and set(Counter(e.label for e in shots.examples).values()) == {2}
    assert len(data.load_dataset("cub", "test", root=root, limit=4)) == 4


def test_cub_broken_tree_and_broken_images(tmp_path, capsys):
    root = fake.make_cub(str(tmp_path))
    with pytest.raises(SystemExit, match="needs --data-root"):
        data.load_dataset("cub", "test")
    with pytest.raises(SystemExit, match="not a directory"):
        data.load_dataset("cub", "test", root=str(tmp_path / "nope"))
    with pytest.raises(SystemExit, match="unknown split"):
        data.load_dataset("cub", "testing", root=root)
    # corrupt images: one truncated, one not an image at all, one listed but missing
    test = data.load_dataset("cub", "test", root=root)
    fake.truncate(test.examples[0].image)
    fake.not_an_image(test.examples[1].image)
    os.remove(test.examples[2].image)
    before = dict(common.IMAGE_PROBLEMS)
    again = data.load_dataset("cub", "test", root=root)
    assert len(again) == len(test) - 3
    assert again.skipped == {"truncated": 1, "not an image": 1, "missing": 1}
    assert common.IMAGE_PROBLEMS["missing"] == before.get("missing", 0) + 1
    err = capsys.readouterr().err
    assert "skipped 3 of 15 images" in err and test.examples[0].image in err
    # a missing index file names itself and the expected layout
    os.remove(os.path.join(root, "train_test_split.txt"))
    with pytest.raises(SystemExit) as e:
        data.load_dataset("cub", "test", root=root)
    msg = str(e.value)
    assert "train_test_split.txt not found" in msg and "Expected layout" in msg and "image_class_labels.txt" in msg
    # a malformed line names the file and the line
    fake.write(os.path.join(root, "train_test_split.txt"), ["1"])
    with pytest.raises(SystemExit, match=r"train_test_split.txt line 1: expected 2 columns"):
        data.load_dataset("cub", "test", root=root)


def test_image_helpers(tmp_path):
    good, bad = str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg")
    fake.jpg(good)
    fake.not_an_image(bad)
    assert data.probe_image(good) is None and data.probe_image(bad) == "not an image"
    assert data.probe_image(str(tmp_path / "c.jpg")) == "missing"
    open(tmp_path / "d.png", "w").close()
    assert data.probe_image(str(tmp_path / "d.png")) == "empty"
    assert common.open_image(good).mode == "RGB"
    with pytest.raises(common.UnreadableImage, match="b.jpg"):
        common.open_image(bad)
    n = common.IMAGE_PROBLEMS["unreadable at open"]
    assert common.try_open_image(bad) is None and common.IMAGE_PROBLEMS["unreadable at open"] == n + 1
    # a JPEG with bytes after its end marker is still whole (decoded to decide)
    with open(good, "ab") as f:
        f.write(b"\0" * 2000)
    assert data.probe_image(good) is None


@needs_scipy
def test_flowers_official_and_coop(tmp_path):
    official = fake.make_flowers(str(tmp_path / "official"))
    for split, n in {"train": 4, "val": 4, "test": 4, "trainval": 8}.items():
        assert len(data.load_dataset("flowers", split, root=official)) == n
    ds = data.load_dataset("flowers", "test", root=official)
    assert ds.class_names == fake.FLOWER_NAMES and ds.kind == "flower"
    assert [e.class_name for e in ds.examples] == fake.FLOWER_NAMES  # image 9..12 -> labels 1..4
    assert ds.hierarchy["rose"] == ["flower"] and ds.synonyms["barbeton daisy"] == ["barberton daisy"]
    coop = fake.make_flowers(str(tmp_path / "coop"), coop=True)  # no .mat files at all: the split file is enough
    assert not os.path.exists(os.path.join(coop, "setid.mat"))
    ds = data.load_dataset("flowers", "train", root=coop)
    assert len(ds) == 4 and ds.class_names == fake.FLOWER_NAMES
    assert os.path.basename(ds.examples[0].image) == "image_00001.jpg"
    os.remove(os.path.join(official, "setid.mat"))
    with pytest.raises(SystemExit, match="setid.mat not found"):
        data.load_dataset("flowers", "test", root=official)


def test_pets_official_and_coop(tmp_path):
    root = fake.make_pets(str(tmp_path / "pets"))
    counts = {s: len(data.load_dataset("pets", s, root=root)) for s in data.SPLITS}
    assert counts == {"train": 16, "val": 4, "test": 8, "trainval": 20}  # 4 breeds x (5 trainval + 2 test)
    ds = data.load_dataset("pets", "test", root=root)
    assert ds.class_names == ["abyssinian", "american bulldog", "bengal", "beagle"] and ds.kind == "pet"
    assert ds.hierarchy["Abyssinian"] == ["cat"] and ds.hierarchy["american bulldog"] == ["dog"]
    assert len(data.load_dataset("pets", "test", root=root, classes="base")) == 4  # ceil(4/2) = 2 breeds
    coop = fake.make_pets(str(tmp_path / "coop"), coop=True)
    shutil.rmtree(os.path.join(coop, "annotations"))  # the CoOp file alone is enough
    assert {s: len(data.load_dataset("pets", s, root=coop)) for s in ("train", "val", "test")} == \
        {"train": 10, "val": 10, "test": 8}
    ds = data.load_dataset("pets", "train", root=coop)
    assert ds.class_names[1] == "american bulldog" and ds.hierarchy["bengal"] == ["cat"]  # species from the case
    broken = fake.make_pets(str(tmp_path / "broken"))
    os.remove(os.path.join(broken, "annotations", "test.txt"))
    with pytest.raises(SystemExit, match=r"annotations/test.txt not found"):
        data.load_dataset("pets", "train", root=broken)


@needs_scipy
def test_cars(tmp_path):
    root = fake.make_cars(str(tmp_path))
    counts = {s: len(data.load_dataset("cars", s, root=root)) for s in data.SPLITS}
    assert counts == {"train": 16, "val": 4, "test": 8, "trainval": 20}
    ds = data.load_dataset("cars", "test", root=root)
    assert ds.class_names == ["2000 AM General Hummer SUV", "2012 Audi TTS Coupe", "2011 Audi TT Hatchback",
                              "2012 Chevrolet Silverado 1500 Crew Cab"]
    assert [e.label for e in ds.examples] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert ds.hierarchy["2012 Chevrolet Silverado 1500 Crew Cab"] == [
        "Chevrolet Silverado 1500 Crew Cab", "Chevrolet Silverado 1500", "Chevrolet", "car"]
    assert ds.hierarchy["2000 AM General Hummer SUV"] == ["AM General Hummer SUV", "AM General Hummer", "AM General",
                                                          "car"]
    assert ds.synonyms["2012 Audi TTS Coupe"] == ["Audi TTS Coupe 2012"]
    with open(os.path.join(root, "devkit", "cars_meta.mat"), "wb") as f:
        f.write(b"not a mat file")
    with pytest.raises(SystemExit, match="cannot read .*cars_meta.mat as a MATLAB file"):
        data.load_dataset("cars", "train", root=root)
    os.remove(os.path.join(root, "cars_test_annos_withlabels.mat"))
    with pytest.raises(SystemExit, match="cars_test_annos_withlabels.mat not found"):
        data.load_dataset("cars", "test", root=root)


def test_mat_without_scipy_says_so(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy", None)  # makes `import scipy.io` fail
    monkeypatch.setitem(sys.modules, "scipy.io", None)
    with pytest.raises(SystemExit, match="needs scipy"):
        data.load_mat("dogs", str(tmp_path / "train_list.mat"))


def test_aircraft(tmp_path):
    fake.make_aircraft(str(tmp_path))
    counts = {s: len(data.load_dataset("aircraft", s, root=str(tmp_path))) for s in data.SPLITS}
    assert counts == {"train": 8, "val": 8, "test": 8, "trainval": 16}  # the official files, parent folder given
    ds = data.load_dataset("aircraft", "test", root=str(tmp_path))
    assert ds.class_names == [v for v, _, _ in fake.AIRCRAFT] and ds.kind == "aircraft"
    assert ds.hierarchy["A340-600"] == ["A340", "Airbus", "aircraft"]
    assert ds.hierarchy["707-320"] == ["Boeing 707", "Boeing", "aircraft"]
    assert ds.hierarchy["Cessna 172"] == ["Cessna", "aircraft"]  # family == variant: dropped
    assert ds.synonyms["A340-600"] == ["Airbus A340-600"] and ds.synonyms["A340"] == ["Airbus A340"]
    assert "Cessna 172" not in ds.synonyms  # already starts with its maker
    os.remove(os.path.join(tmp_path, "fgvc-aircraft-2013b", "data", "images_variant_val.txt"))
    with pytest.raises(SystemExit, match="images_variant_val.txt not found"):
        data.load_dataset("aircraft", "val", root=str(tmp_path))


@needs_scipy
def test_dogs(tmp_path):
    root = fake.make_dogs(str(tmp_path))
    counts = {s: len(data.load_dataset("dogs", s, root=root)) for s in data.SPLITS}
    assert counts == {"train": 12, "val": 3, "test": 6, "trainval": 15}
    ds = data.load_dataset("dogs", "test", root=root)
    assert ds.class_names == ["Chihuahua", "Japanese spaniel", "Maltese dog"] and ds.kind == "dog"
    assert ds.hierarchy["Maltese dog"] == ["dog"]
    assert all(e.image.startswith(os.path.join(root, "Images")) for e in ds.examples)
    os.remove(os.path.join(root, "test_list.mat"))
    with pytest.raises(SystemExit, match="test_list.mat not found"):
        data.load_dataset("dogs", "train", root=root)


def test_food(tmp_path):
    fake.make_food(str(tmp_path))
    counts = {s: len(data.load_dataset("food", s, root=str(tmp_path))) for s in data.SPLITS}
    assert counts == {"train": 12, "val": 3, "test": 6, "trainval": 15}
    ds = data.load_dataset("food", "test", root=str(tmp_path))
    assert ds.class_names == ["Apple pie", "Fish and chips", "Pho"] and ds.hierarchy["pho"] == ["food"]
    os.remove(os.path.join(tmp_path, "food-101", "meta", "train.txt"))
    with pytest.raises(SystemExit, match=r"meta/train.txt not found"):
        data.load_dataset("food", "train", root=str(tmp_path))


def test_json_and_jsonl(tmp_path):
    for i in range(6):
        fake.jpg(str(tmp_path / "img" / f"{i}.jpg"), seed=i)
    # JSONL with a split field and classes.txt next to it
    fake.write(str(tmp_path / "classes.txt"), ["Yellow Warbler", "Song Sparrow", "Warbler"])
    recs = [{"image": f"img/{i}.jpg", "class_name": ["Yellow Warbler", "song sparrow"][i % 2],
             "split": "train" if i < 4 else "test"} for i in range(6)]
    fake.write(str(tmp_path / "data.jsonl"), [json.dumps(r) for r in recs])
    ds = data.load_dataset(str(tmp_path / "data.jsonl"), "train")
    assert len(ds) == 4 and ds.class_names == ["Yellow Warbler", "Song Sparrow", "Warbler"]
    assert ds.examples[1].class_name == "Song Sparrow" and ds.examples[1].label == 1  # matched after normalising
    assert len(data.load_dataset(str(tmp_path / "data.jsonl"), "test")) == 2
    assert ds.hierarchy["Song Sparrow"] == ["object"]  # no hierarchy given: just the kind
    # JSON object with classes, kind, hierarchy, per-split lists; one record's image is broken
    fake.not_an_image(str(tmp_path / "img" / "5.jpg"))
    doc = {"classes": ["Yellow Warbler", "Song Sparrow"], "kind": "bird",
           "hierarchy": {"Yellow Warbler": ["warbler"], "warbler": ["bird"]},
           "train": recs[:4], "test": [{"image": f"img/{i}.jpg", "class_name": "Song Sparrow"} for i in (4, 5)]}
    with open(tmp_path / "data.json", "w") as f:
        json.dump(doc, f)
    ds = data.load_dataset(str(tmp_path / "data.json"), "test")
    assert len(ds) == 1 and ds.skipped == {"not an image": 1} and ds.kind == "bird"
    assert ds.hierarchy["Yellow Warbler"] == ["warbler", "bird"] and ds.hierarchy["Song Sparrow"] == ["bird"]
    # {split} in the path: one file per split
    fake.write(str(tmp_path / "per" / "val.jsonl"), [json.dumps({"image": os.path.abspath(tmp_path / "img" / "0.jpg"),
                                                                 "class_name": "Pho"})])
    ds = data.load_dataset(str(tmp_path / "per" / "{split}.jsonl"), "val")
    assert len(ds) == 1 and ds.class_names == ["Pho"]  # no class list: the sorted names
    # bad input names the file and what was expected
    fake.write(str(tmp_path / "bad.jsonl"), [json.dumps({"img": "x.jpg"})])
    with pytest.raises(SystemExit, match=r"bad.jsonl: record 1 .*expected"):
        data.load_dataset(str(tmp_path / "bad.jsonl"), "train")
    fake.write(str(tmp_path / "number.jsonl"), [json.dumps({"image": "x.jpg", "class_name": 17})])
    with pytest.raises(SystemExit, match=r"number.jsonl: record 1 is .*17.* with text values"):
        data.load_dataset(str(tmp_path / "number.jsonl"), "train")
    fake.write(str(tmp_path / "broken.jsonl"), [json.dumps({"image": "x.jpg", "class_name": "Wren"}), "", "{oops"])
    with pytest.raises(SystemExit, match=r"broken.jsonl: line 3 is not valid JSON"):  # the editor's line number
        data.load_dataset(str(tmp_path / "broken.jsonl"), "train")
    fake.write(str(tmp_path / "cased.jsonl"), [json.dumps({"image": "x.jpg", "class_name": "Wren", "split": "Test"})])
    with pytest.raises(SystemExit, match=r"no record of split 'test'; the file's splits are \['Test'\]"):
        data.load_dataset(str(tmp_path / "cased.jsonl"), "test")
    fake.write(str(tmp_path / "bad2.jsonl"), [json.dumps({"image": "x.jpg", "class_name": "Robin", "split": "train"})])
    with open(tmp_path / "bad2.json", "w") as f:
        json.dump({"classes": ["Wren"], "train": [{"image": "x.jpg", "class_name": "Robin"}]}, f)
    with pytest.raises(SystemExit, match="'Robin', which is not in the class list"):
        data.load_dataset(str(tmp_path / "bad2.json"), "train")
    with pytest.raises(SystemExit, match="file not found"):
        data.load_dataset(str(tmp_path / "missing.jsonl"), "train")


def test_toy_and_unknown():
    ds = data.load_dataset("toy", "val")
    assert len(ds) == 24 * 5 and ds.kind == "shape" and ds.skipped == {}
    assert ds.hierarchy["Red Striped Circle"] == ["circle", "shape"] and ds.synonyms["red striped circle"] == [
        "striped red circle"]
    assert len(data.load_dataset("toy", "trainval")) == 24 * 25
    assert len(data.load_dataset("toy", "test", classes="novel")) == 12 * 15
    with pytest.raises(SystemExit, match="unknown dataset"):
        data.load_dataset("imagenet", "test")
    with pytest.raises(SystemExit, match="--classes"):
        data.load_dataset("toy", "test", classes="seen")


def test_an_image_of_extreme_aspect_ratio_is_skipped_and_named(tmp_path, capsys):
    """Qwen2.5-VL's processor raises on a long side over 200x the short one (mid-run, on every rerun): the load-time
    probe skips such an image with the others that cannot be used, naming it."""
    from PIL import Image
    (tmp_path / "img").mkdir()
    Image.new("RGB", (4000, 2)).save(tmp_path / "img" / "strip.png")
    Image.new("RGB", (40, 30)).save(tmp_path / "img" / "fine.png")
    assert data.probe_image(str(tmp_path / "img" / "strip.png")) == "aspect ratio over 200"
    assert data.probe_image(str(tmp_path / "img" / "fine.png")) is None
    fake.write(str(tmp_path / "d.jsonl"), [json.dumps({"image": f"img/{n}.png", "class_name": "Wren"})
                                           for n in ("strip", "fine")])
    ds = data.load_dataset(str(tmp_path / "d.jsonl"), "train")
    assert len(ds) == 1 and ds.skipped == {"aspect ratio over 200": 1}
    assert "strip.png (aspect ratio over 200)" in capsys.readouterr().err
