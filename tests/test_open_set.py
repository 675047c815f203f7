"""Open-set semi-supervised data (DESIGN §6, ``data.open_set``): unseen classes stay out of the labeled,
validation and test data and in the unlabeled pool; the remaining classes are renumbered and the model
follows; an ImageFolder (or another dataset) joins the pool; the pool's open-set fraction; seen/unseen logs."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from raykd.config import dump_run_config, parse_run_config
from raykd.data import ArrayDataset, DatasetBundle, data_of
from raykd.data.imagefolder import fit_images, list_images, load_imagefolder
from raykd.data.split import UNSEEN, open_set_data, subsample_pool
from raykd.errors import ConfigError
from raykd.methods.fixmatch import seen_unseen_means
from raykd.testing import tiny_run_config
from raykd.train.context import LocalSession
from raykd.train.loop import train_loop


def coded_bundle(n_train=250, n_test=100, num_classes=5, extra=0) -> DatasetBundle:
    """Pixel (0, 0) of each image holds its original class, pixel (0, 1) its position: splits can be decoded."""

    def make(n, offset):
        labels = torch.arange(n) % num_classes
        images = torch.zeros(n, 1, 4, 4, dtype=torch.uint8)
        images[:, 0, 0, 0] = labels.to(torch.uint8)
        images[:, 0, 0, 1] = (torch.arange(n) + offset).to(torch.uint8)
        return ArrayDataset(images, labels)

    extra_ds = None
    if extra:
        extra_ds = ArrayDataset(torch.full((extra, 1, 4, 4), 200, dtype=torch.uint8), torch.full((extra,), -1))
    return DatasetBundle(make(n_train, 0), make(n_test, 0), num_classes, True, (0.5,), (0.25,), extra_ds)


def open_set(**kw):
    return parse_run_config(
        {"data": {"name": "digits", "open_set": kw}, "method": {"name": "fixmatch"}}
    ).data.open_set  # fmt: skip


def original_class(ds: ArrayDataset) -> torch.Tensor:
    return ds.images[:, 0, 0, 0].long()


def test_unseen_classes_stay_out_of_labeled_val_and_test_and_in_the_pool():
    bundle = coded_bundle()
    data = open_set_data(bundle, open_set(unseen_classes=[3, 1]), labels_per_class=6, val_per_class=4, seed=0)
    assert data.num_classes == 3 and data.classes == (0, 2, 4)
    for ds in (data.labeled, data.val, data.test):
        orig = original_class(ds)
        assert not torch.isin(orig, torch.tensor([1, 3])).any()
        # renumbered in original order: 0 -> 0, 2 -> 1, 4 -> 2
        assert torch.equal(torch.tensor(data.classes)[ds.labels], orig)
    assert len(data.labeled) == 3 * 6 and len(data.val) == 3 * 4
    assert len(data.test) == 60  # the 60 test images of classes 0, 2, 4
    pool = data.unlabeled
    orig = original_class(pool)
    unseen = torch.isin(orig, torch.tensor([1, 3]))
    assert int(unseen.sum()) == 100  # every training image of the unseen classes is unlabeled data
    assert torch.all(pool.labels[unseen] == UNSEEN)
    assert torch.equal(torch.tensor(data.classes)[pool.labels[~unseen]], orig[~unseen])
    val_positions = set(data.val.images[:, 0, 0, 1].tolist())
    assert not val_positions & set(pool.images[:, 0, 0, 1].tolist())  # validation is held out of the pool


def test_open_set_split_is_deterministic_and_labels_a_subset_of_the_closed_split():
    bundle = coded_bundle()
    a = open_set_data(bundle, open_set(unseen_classes=[4]), labels_per_class=5, seed=3)
    b = open_set_data(bundle, open_set(unseen_classes=[4]), labels_per_class=5, seed=3)
    c = open_set_data(bundle, open_set(unseen_classes=[4]), labels_per_class=5, seed=4)
    assert torch.equal(a.labeled.images, b.labeled.images) and torch.equal(a.unlabeled.labels, b.unlabeled.labels)
    assert not torch.equal(a.labeled.images, c.labeled.images)


def test_unseen_fraction_subsamples_the_larger_side_and_keeps_unknown_samples():
    labels = torch.cat([torch.arange(300) % 3, torch.full((100,), UNSEEN), torch.full((7,), -1)])
    for fraction, seen, unseen in ((0.0, 300, 0), (1.0, 0, 100), (0.2, 300, 75), (0.5, 100, 100)):
        keep = subsample_pool(labels, fraction, seed=0)
        assert int((keep & (labels >= 0)).sum()) == seen
        assert int((keep & (labels == UNSEEN)).sum()) == unseen
        assert bool(keep[-7:].all())  # unknown-class samples are never dropped
    assert torch.equal(subsample_pool(labels, 0.3, 1), subsample_pool(labels, 0.3, 1))
    assert not torch.equal(subsample_pool(labels, 0.3, 1), subsample_pool(labels, 0.3, 2))

    data = open_set_data(coded_bundle(extra=10), open_set(unseen_classes=[0, 1], unseen_fraction=0.25), 4, 0, 0)
    pool = data.unlabeled.labels
    assert int((pool == UNSEEN).sum()) / int((pool != -1).sum()) == pytest.approx(0.25, abs=0.01)
    assert int((pool == -1).sum()) == 10


def test_model_follows_the_seen_classes_and_the_test_set_has_only_them(tmp_path):
    cfg = tiny_run_config("fixmatch", data={"open_set": {"unseen_classes": [7, 8, 9]}},
                          train={"steps": 2, "eval_every": 2})  # fmt: skip
    seen = {}
    metrics = train_loop(cfg, LocalSession(tmp_path), tmp_path, on_end=lambda ctx, m: seen.update(ctx=ctx))
    ctx = seen["ctx"]
    assert ctx.raw_model.classifier.out_features == 7 == ctx.num_classes
    assert int(ctx.data.test.labels.max()) == 6 and len(ctx.data.test) < len(data_of(tiny_run_config("fixmatch")).test)
    # FixMatch's mask rate is split into seen-class and open-set unlabeled samples
    assert {"mask_rate_seen", "mask_rate_unseen"} <= set(metrics)
    assert 0.0 <= metrics["mask_rate_seen"] <= 1.0 and 0.0 <= metrics["mask_rate_unseen"] <= 1.0


def test_seen_unseen_means_on_hand_made_values():
    values = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    hidden = torch.tensor([0, 3, UNSEEN, UNSEEN, UNSEEN, -1])  # -1: class unknown, counted on neither side
    logs = seen_unseen_means("mask_rate", values, hidden)
    seen, unseen = logs["mask_rate_seen"], logs["mask_rate_unseen"]
    assert (float(seen[0]), float(seen[1])) == (1.0, 2.0)
    assert (float(unseen[0]), float(unseen[1])) == (2.0, 3.0)
    assert seen_unseen_means("x", values, None) == {"x_seen": (0.0, 0.0), "x_unseen": (0.0, 0.0)}


def _png(path, array):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)


def write_folder(root):
    """Two classes; RGB and grey PNGs of several sizes, one nested, plus files that must be skipped."""
    red = np.zeros((12, 12, 3), np.uint8)
    red[..., 0] = 255
    _png(root / "cat" / "a.png", red)
    wide = np.zeros((8, 16), np.uint8)
    wide[:, 4:12] = 200  # the centred 8x8 square is 200, the sides 0
    _png(root / "cat" / "b.png", wide)
    _png(root / "dog" / "images" / "c.png", np.full((4, 4), 50, np.uint8))  # nested, upscaled
    (root / "dog" / "dog_boxes.txt").write_text("not an image")
    _png(root / "dog" / ".hidden.png", np.zeros((4, 4), np.uint8))
    (root / "notes.txt").write_text("a file beside the class folders")


def test_imagefolder_reader_on_a_written_fixture(tmp_path):
    write_folder(tmp_path / "pool")
    files, labels, classes = list_images(tmp_path / "pool")
    assert classes == ["cat", "dog"] and [f.name for f in files] == ["a.png", "b.png", "c.png"]
    assert labels.tolist() == [0, 0, 1]
    grey = load_imagefolder(tmp_path / "pool", channels=1, size=8)
    assert grey.images.shape == (3, 1, 8, 8) and grey.images.dtype == torch.uint8
    assert grey.labels.tolist() == [0, 0, 1]
    assert int(grey.images[0].min()) == int(grey.images[0].max()) == round(0.299 * 255)  # red -> luma
    assert torch.all(grey.images[1] == 200)  # centre crop of the wide image, not a squashed resize
    assert torch.all(grey.images[2] == 50)
    rgb = load_imagefolder(tmp_path / "pool", channels=3, size=6)
    assert rgb.images.shape == (3, 3, 6, 6)
    assert rgb.images[0, :, 0, 0].tolist() == [255, 0, 0] and rgb.images[2, :, 0, 0].tolist() == [50, 50, 50]


def test_imagefolder_is_decoded_once_then_read_from_the_disk_cache(tmp_path, monkeypatch):
    """The first load writes the decoded array to $RAYKD_CACHE; a new process (the in-process cache
    cleared) loads it without decoding; changing an image changes the key and decodes again."""
    from raykd.data import imagefolder

    monkeypatch.setenv("RAYKD_CACHE", str(tmp_path / "cache"))
    write_folder(tmp_path / "pool")
    first = load_imagefolder(tmp_path / "pool", channels=3, size=6)
    cached = sorted((tmp_path / "cache" / "imagefolder").glob("*.npy"))
    assert [p.name.split("-")[:2] for p in cached] == [["pool", "3x6"]]
    decoded = []
    real_decode = imagefolder._decode
    monkeypatch.setattr(imagefolder, "_decode", lambda *a: decoded.append(a) or real_decode(*a))
    imagefolder._load.cache_clear()  # as in another worker process
    again = load_imagefolder(tmp_path / "pool", channels=3, size=6)
    assert decoded == [] and torch.equal(again.images, first.images) and torch.equal(again.labels, first.labels)
    _png(tmp_path / "pool" / "dog" / "images" / "c.png", np.full((4, 4), 90, np.uint8))
    imagefolder._load.cache_clear()
    changed = load_imagefolder(tmp_path / "pool", channels=3, size=6)
    assert len(decoded) == 1 and changed.images[2, :, 0, 0].tolist() == [90, 90, 90]
    assert len(list((tmp_path / "cache" / "imagefolder").glob("*.npy"))) == 2
    monkeypatch.setenv("RAYKD_CACHE", "off")
    imagefolder._load.cache_clear()
    load_imagefolder(tmp_path / "pool", channels=3, size=6)
    assert len(decoded) == 2 and len(list((tmp_path / "cache" / "imagefolder").glob("*.npy"))) == 2


def test_imagefolder_cache_write_failure_decodes_once_and_leaves_no_partial_file(tmp_path, monkeypatch):
    from raykd.data import imagefolder

    monkeypatch.setenv("RAYKD_CACHE", str(tmp_path / "cache"))
    write_folder(tmp_path / "pool")
    decoded = []
    real_decode = imagefolder._decode
    monkeypatch.setattr(imagefolder, "_decode", lambda *a: decoded.append(a) or real_decode(*a))

    def full_disk(path, array):
        Path(path).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(imagefolder.np, "save", full_disk)
    imagefolder._load.cache_clear()
    pool = load_imagefolder(tmp_path / "pool", channels=1, size=8)
    assert len(decoded) == 1 and pool.images.shape == (3, 1, 8, 8)
    assert list((tmp_path / "cache" / "imagefolder").glob("*.npy")) == []


def test_imagefolder_errors_name_the_field(tmp_path):
    field = "data.open_set.extra_unlabeled.root"
    with pytest.raises(ConfigError) as info:
        load_imagefolder(tmp_path / "missing", 1, 8, field=field)
    assert info.value.field == field
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(ConfigError, match="no image files"):
        load_imagefolder(tmp_path / "empty", 1, 8, field=field)
    (tmp_path / "bad" / "cls").mkdir(parents=True)
    (tmp_path / "bad" / "cls" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ConfigError, match="broken.png") as info:
        load_imagefolder(tmp_path / "bad", 1, 8, field=field)
    assert info.value.field == field


def test_extra_unlabeled_imagefolder_joins_the_pool_as_open_set_data(tmp_path):
    write_folder(tmp_path / "pool")
    closed = data_of(tiny_run_config("fixmatch"))
    folder = {"name": "imagefolder", "root": str(tmp_path / "pool")}
    cfg = tiny_run_config("fixmatch", data={"open_set": {"extra_unlabeled": folder}})
    data = data_of(cfg)
    assert data.num_classes == 10 and data.classes is None and len(data.test) == len(closed.test)
    assert len(data.unlabeled) == len(closed.unlabeled) + 3
    assert data.unlabeled.images.shape[1:] == (1, 8, 8)
    assert data.unlabeled.labels[-3:].tolist() == [UNSEEN] * 3
    assert torch.all(data.unlabeled.images[-1] == 50)
    only = data_of(tiny_run_config("fixmatch", data={"open_set": {"extra_unlabeled": folder, "unseen_fraction": 1.0}}))
    assert len(only.unlabeled) == 3  # the SRD paper's protocol: the pool is the extra collection alone
    with pytest.raises(ConfigError) as info:
        data_of(tiny_run_config("fixmatch", data={"open_set": {"extra_unlabeled": {
            "name": "imagefolder", "root": str(tmp_path / "nowhere")}}}))  # fmt: skip
    assert info.value.field == "data.open_set.extra_unlabeled.root"


def test_fit_images_converts_channels_crops_and_resizes():
    rgb = torch.zeros(2, 3, 6, 10, dtype=torch.uint8)
    rgb[:, 1] = 100
    grey = fit_images(rgb, channels=1, size=6)
    assert grey.shape == (2, 1, 6, 6) and torch.all(grey == round(0.587 * 100))
    up = fit_images(torch.full((1, 1, 4, 4), 9, dtype=torch.uint8), channels=3, size=8)
    assert up.shape == (1, 3, 8, 8) and torch.all(up == 9)
    same = torch.randint(0, 255, (3, 1, 8, 8), dtype=torch.uint8)
    assert fit_images(same, 1, 8) is same or torch.equal(fit_images(same, 1, 8), same)


def test_open_set_config_rules():
    def parse(open_set, **extra):
        return parse_run_config(
            {"data": {"name": "digits", "open_set": open_set}, "method": {"name": "fixmatch"}, **extra}
        )

    for bad, field in (
        ({}, "data.open_set"),
        ({"unseen_classes": [1, 1]}, "data.open_set.unseen_classes"),
        ({"unseen_classes": [-1]}, "data.open_set.unseen_classes"),
        ({"unseen_classes": [1], "unseen_fraction": 1.5}, "data.open_set.unseen_fraction"),
        ({"extra_unlabeled": {"name": "imagefolder"}}, "data.open_set.extra_unlabeled"),
        ({"extra_unlabeled": {"name": "tiny_imagenet"}}, "data.open_set.extra_unlabeled.name"),
        ({"unseen_classes": [1], "colour": 1}, "data.open_set.colour"),
    ):
        with pytest.raises(ConfigError) as info:
            parse(bad)
        assert info.value.field == field, bad
    with pytest.raises(ConfigError) as info:
        data_of(parse({"unseen_classes": [10]}))
    assert info.value.field == "data.open_set.unseen_classes" and "0..9" in info.value.message
    with pytest.raises(ConfigError) as info:
        data_of(parse({"unseen_classes": list(range(9))}))
    assert "keep at least 2" in info.value.message
    assert parse({"unseen_classes": [9, 6, 7]}).data.open_set.unseen_classes == [6, 7, 9]


def test_resolved_configs_without_open_set_are_unchanged_and_with_it_round_trip():
    import yaml

    closed = tiny_run_config("kd")
    assert "open_set" not in yaml.safe_load(dump_run_config(closed))["data"]  # old teacher hashes stay valid
    with pytest.raises(ConfigError) as info:  # the teacher must share the student's classes
        tiny_run_config("kd", data={"open_set": {"unseen_classes": [8, 9]}})
    assert info.value.field == "teacher.run.data.open_set.unseen_classes"
    raw = closed.model_dump(mode="json")
    raw["data"]["open_set"] = raw["teacher"]["run"]["data"]["open_set"] = {"unseen_classes": [8, 9]}
    cfg = parse_run_config(raw)
    again = parse_run_config(yaml.safe_load(dump_run_config(cfg)))
    assert again == cfg and again.data.open_set.unseen_classes == [8, 9]
    assert data_of(cfg).num_classes == 8


@pytest.mark.skipif(not os.path.isdir("/usr/share/datasets/fashion-mnist"), reason="needs dataset-fashion-mnist")
def test_another_registered_dataset_as_the_extra_pool_is_fitted_to_the_labeled_shape():
    closed = data_of(tiny_run_config("fixmatch"))
    cfg = tiny_run_config("fixmatch", data={"open_set": {"extra_unlabeled": {"name": "fashion_mnist"},
                                                         "unseen_fraction": 0.5}})  # fmt: skip
    pool = data_of(cfg).unlabeled
    assert pool.images.shape[1:] == (1, 8, 8)  # 28x28 Fashion-MNIST resized to the digits' 8x8
    assert int((pool.labels == UNSEEN).sum()) == int((pool.labels >= 0).sum()) == len(closed.unlabeled)
