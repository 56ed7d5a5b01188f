"""WSOL on wsolevaluation's metadata layout, on generated CUB-like folders: parsing, boxes at the evaluated size,
the same metrics as the Tiny-ImageNet path on the same maps, several boxes per image, one-line errors, and
``attnlab train`` + ``attnlab localize`` end to end."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("cv2", reason="attnlab[wsol] (opencv-python-headless) not installed")

from attnlab.cli import main
from attnlab.data.boxes import scale_boxes, snap_to_pixels, split_box_sets, split_boxes
from attnlab.data.datasets import load_dataset
from attnlab.data.wsol_metadata import wsol_source
from attnlab.engine.config import load_config
from attnlab.errors import AttnlabError
from attnlab.localization.command import localize
from attnlab.localization.metrics import BoxEvaluator, prior_baselines, summarize, thresholds_grid
from attnlab.models import create_model
from attn_helpers import cam_test_model

W, H = 64, 48  # original image size (width, height)
CLASSES = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]


def _jpeg(path, seed):
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)  # smooth content: JPEG keeps it stable
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(small).resize((W, H), Image.BILINEAR).save(path, quality=95)


def _write_split(meta, split, rows):
    """rows: (image_id, class, [boxes] or None)."""
    d = meta / split
    d.mkdir(parents=True, exist_ok=True)
    (d / "image_ids.txt").write_text("".join(f"{i}\n" for i, _, _ in rows))
    (d / "class_labels.txt").write_text("".join(f"{i},{c}\n" for i, c, _ in rows))
    (d / "image_sizes.txt").write_text("".join(f"{i},{W},{H}\n" for i, _, _ in rows))
    if any(b is not None for _, _, b in rows):
        (d / "localization.txt").write_text(
            "".join(f"{i},{x0},{y0},{x1},{y1}\n" for i, _, boxes in rows for x0, y0, x1, y1 in boxes))


def _box(c, k):
    """A known box per image (some images get a second, disjoint one)."""
    return [2 + c + k, 3 + k, 20 + 2 * c + k, 25 + c]


SECOND = [40, 28, 62, 46]  # the second box of the images that have two


@pytest.fixture
def cub(tmp_path):
    """3 classes x 4 images, 64x48 JPEGs; per class 2 train, 1 val, 1 test; val/test images of class 1 and 2 have
    a second box."""
    root, meta = tmp_path / "images", tmp_path / "metadata" / "CUB"
    splits = {"train": [], "val": [], "test": []}
    for c, cls in enumerate(CLASSES):
        for k in range(4):
            image_id = f"{cls}/{cls.split('.')[1]}_{k:04d}.jpg"
            _jpeg(root / image_id, 10 * c + k)
            split = ("train", "train", "val", "test")[k]
            boxes = None if split == "train" else [_box(c, k)] + ([SECOND] if c > 0 else [])
            splits[split].append((image_id, c, boxes))
    for split, rows in splits.items():
        _write_split(meta, split, rows)
    return root, meta, splits


def test_reading_the_metadata_gives_labels_sizes_and_boxes(cub):
    root, meta, splits = cub
    src = wsol_source("wsol", root, meta)
    assert src.classes == ["0", "1", "2"] and src.class_names == CLASSES
    assert src.train.labels.tolist() == [0, 0, 1, 1, 2, 2] and src.val.labels.tolist() == [0, 1, 2]
    assert src.test.files == [r[0] for r in splits["test"]]
    assert src.val.sizes.tolist() == [[H, W]] * 3  # (h, w)
    assert src.train.box_sets is None
    assert src.val.box_sets.shape == (3, 2, 4)
    assert src.val.box_sets[0, 0].tolist() == _box(0, 2) and np.isnan(src.val.box_sets[0, 1]).all()
    assert src.val.box_sets[1].tolist() == [_box(1, 2), SECOND]
    assert src.val.boxes.tolist() == [_box(c, 2) for c in range(3)]  # the first box of each image

    b = load_dataset("wsol", data_dir=root, metadata=meta, image_size=32, cache_dir=None)
    assert (len(b.train), len(b.val), len(b.test)) == (6, 3, 3) and b.num_classes == 3
    assert b.val.files == [r[0] for r in splits["val"]] and b.val.labels.tolist() == [0, 1, 2]
    assert tuple(b.val.images.shape[1:]) == (3, 32, 32)
    # At 32x32 the 64x48 frame scales by 1/2 in x and 2/3 in y; the interval [x0, x1 + 1) is scaled and snapped
    # outward: box (4, 5, 22, 26) -> x 2 .. 23/2 - 1 = 10.5 -> 11, y 10/3 = 3.33 -> 3 .. 27*2/3 - 1 = 17 -> 17.
    sets = split_box_sets(b.val, "wsol")
    assert sets[0].tolist() == [[2, 3, 11, 17]]
    # second box (40, 28, 62, 46): x 20 .. 63/2 - 1 = 30.5 -> 31; y 56/3 = 18.67 -> 18 .. 47*2/3 - 1 = 30.33 -> 31
    assert sets[1].tolist() == [[2, 3, 12, 17], [20, 18, 31, 31]]
    assert split_boxes(b.val, "wsol").tolist() == [s[0].tolist() for s in sets]  # the first box of each image
    # the same function scales every dataset's boxes: Tiny-ImageNet's single boxes give the same numbers
    single = scale_boxes(np.array([[4, 5, 22, 26]], np.float32), np.array([[H, W]]), (32, 32))
    assert snap_to_pixels(torch.from_numpy(single), (32, 32)).tolist() == [[2, 3, 11, 17]]


def _tiny_layout(root):
    """The same kind of images in the Tiny-ImageNet layout (one box each): 3 classes x 5 train, 2 test each."""
    wnids = ["n001", "n002", "n003"]
    (root / "wnids.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    ann = []
    for c, w in enumerate(wnids):
        lines = []
        for k in range(5):
            name = f"{w}_{k}.JPEG"
            _jpeg(root / "train" / w / "images" / name, 100 + 10 * c + k)
            lines.append(f"{name}\t" + "\t".join(map(str, _box(c, k))))
        (root / "train" / w / f"{w}_boxes.txt").write_text("\n".join(lines) + "\n")
        for k in range(2):
            name = f"val_{c}_{k}.JPEG"
            _jpeg(root / "val" / "images" / name, 200 + 10 * c + k)
            ann.append(f"{name}\t{w}\t" + "\t".join(map(str, _box(c, k + 5))))
    (root / "val" / "val_annotations.txt").write_text("\n".join(ann) + "\n")


def test_a_box_that_is_not_four_numbers_names_its_file_and_line(tmp_path):
    root = tmp_path / "tin"
    _tiny_layout(root)
    ann = root / "val" / "val_annotations.txt"
    lines = ann.read_text().splitlines()
    lines[1] = "\t".join(lines[1].split("\t")[:3] + ["x", "20", "30"])
    ann.write_text("\n".join(lines) + "\n")
    with pytest.raises(AttnlabError, match=rf"{ann} line 2: a box is four numbers \(x0 y0 x1 y1\), got '.* x 20 30'$"):
        load_dataset("tiny-imagenet", data_dir=root, cache_dir=None)


def test_a_box_with_swapped_corners_names_its_file_and_line(tmp_path):
    root = tmp_path / "tin"
    _tiny_layout(root)
    boxes = next((root / "train").glob("*/*_boxes.txt"))
    lines = boxes.read_text().splitlines()
    name, x0, y0, x1, y1 = lines[2].split("\t")
    lines[2] = "\t".join([name, x1, y0, x0, y1])  # x0 and x1 swapped
    boxes.write_text("\n".join(lines) + "\n")
    with pytest.raises(AttnlabError, match=rf"{boxes} line 3: a box's corners come in the order x0 y0 x1 y1 with "
                                           rf"x0 <= x1 and y0 <= y1, got '{x1} {y0} {x0} {y1}'$"):
        load_dataset("tiny-imagenet", data_dir=root, cache_dir=None)


def _model():
    return cam_test_model(num_classes=3)


def test_metadata_path_gives_the_same_metrics_as_the_tiny_imagenet_path(tmp_path):
    root = tmp_path / "tin"
    _tiny_layout(root)
    tin = load_dataset("tiny-imagenet", data_dir=root, val_size=3, image_size=32, cache_dir=None)
    # The same images, labels and boxes written as wsolevaluation metadata over the same image root.
    meta = tmp_path / "metadata" / "TIN"
    native = load_dataset("tiny-imagenet", data_dir=root, val_size=3, cache_dir=None)  # boxes in the 64x48 frame
    for name in ("train", "val", "test"):
        s = getattr(native, name)
        rows = [(f, int(y), None if name == "train" else [[int(v) for v in box]])
                for f, y, box in zip(s.files, s.labels.tolist(), s.boxes.tolist())]
        _write_split(meta, name, rows)
    wsol = load_dataset("wsol", data_dir=root, metadata=meta, image_size=32, cache_dir=None)
    for name in ("train", "val", "test"):
        a, b = getattr(tin, name), getattr(wsol, name)
        assert a.files == b.files and torch.equal(a.labels, b.labels) and torch.equal(a.images, b.images)
    assert wsol.mean == tin.mean and wsol.std == tin.std
    for name in ("val", "test"):
        assert [x.tolist() for x in split_box_sets(getattr(tin, name), "t")] == \
               [x.tolist() for x in split_box_sets(getattr(wsol, name), "w")]
    model = _model()
    res_tin = localize(model, tin, interval=0.01, batch_size=4)
    res_wsol = localize(model, wsol, interval=0.01, batch_size=4)
    assert res_tin.pop("dataset") == "tiny-imagenet" and res_wsol.pop("dataset") == "wsol"
    assert res_wsol == res_tin  # every metric, tau and prior, exactly


def _blob(size, box):
    """A score map that is 1 on the pixels of ``box`` (inclusive) and 0 elsewhere."""
    s = np.zeros(size, np.float32)
    x0, y0, x1, y1 = (int(v) for v in box)
    s[y0:y1 + 1, x0:x1 + 1] = 1
    return s


def test_a_map_on_the_second_box_is_a_hit(cub):
    root, meta, _ = cub
    b = load_dataset("wsol", data_dir=root, metadata=meta, image_size=32, cache_dir=None)
    sets = split_box_sets(b.val, "wsol")
    first = sets[1][0]
    taus = thresholds_grid(0.1)
    maps = np.stack([_blob((32, 32), s[-1]) for s in sets])  # images 1, 2: the second box; image 0: its only box
    ev = BoxEvaluator(taus)
    ev.add(maps, sets)
    multi, single = ev.curves()
    assert (single[:, 5] >= 0.5).all() and (multi[:, 5] >= 0.5).all()
    res = summarize(multi, single, taus)
    assert res["max_box_acc"] == 100.0 and res["max_box_acc_v2_iou"]["50"] == 100.0
    only_first = BoxEvaluator(taus)
    only_first.add(maps[1:2], [first[None]])  # the same map scored against the first box alone misses
    assert only_first.curves()[1][0, 5] == 0.0
    # the priors take box sets too: the full-image box against two boxes scores its better one
    pri = prior_baselines([first[None], np.stack([first, [0, 0, 31, 31]])], (32, 32), taus)
    assert pri["full_image"]["iou"]["70"] == 50.0


def test_show_draws_every_box_of_an_image(cub, tmp_path, monkeypatch):
    """``attnlab show``'s cams.png: an image with two ground-truth boxes gets both drawn (green, in the image row and
    the CAM row), at their pixel positions; the red box from the CAM is drawn once."""
    from matplotlib.colors import to_rgba
    from matplotlib.patches import Rectangle
    from attnlab.viz import command as viz
    root, meta, _ = cub
    b = load_dataset("wsol", data_dir=root, metadata=meta, image_size=32, cache_dir=None)
    sets = split_box_sets(b.val, "wsol")
    assert [len(s) for s in sets] == [1, 2, 2]
    drawn = {}
    save = viz.save_figure

    def capture(fig, path):
        if path.name == "cams.png":
            axes = np.array(fig.axes[:3 * len(sets)]).reshape(3, -1)
            for row in (0, 1):
                for j, ax in enumerate(axes[row]):
                    for r in ax.patches:
                        if isinstance(r, Rectangle):
                            colour = "green" if r.get_edgecolor() == to_rgba("lime") else "red"
                            x, y = r.get_xy()
                            drawn.setdefault((row, j, colour), []).append(
                                [x + 0.5, y + 0.5, x - 0.5 + r.get_width(), y - 0.5 + r.get_height()])
        return save(fig, path)

    monkeypatch.setattr(viz, "save_figure", capture)
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=3).eval()
    viz.show(model, b, "val", tmp_path / "show", count=3, tau=0.5)
    idx = viz.pick_images(len(b.val), 3, b.val.labels)
    for j, i in enumerate(idx):
        for row in (0, 1):
            assert sorted(drawn[(row, j, "green")]) == sorted(sets[i].tolist())
        assert len(drawn[(1, j, "red")]) == 1 and (0, j, "red") not in drawn


@pytest.mark.parametrize("case, pattern", [
    ("missing", r"missing file .*val[/\\]image_sizes\.txt"),
    ("no_size", r"val[/\\]image_sizes\.txt has no line for image '002\.Laysan_Albatross/Laysan_Albatross_0002\.jpg'"
                r" \(line 2 of .*image_ids\.txt"),
    ("outside", r"test[/\\]localization\.txt line 3: box \(40, 28, 65, 46\) of '002.*' is not inside its 64x48 "
                r"frame"),
    ("masks", r"test[/\\]localization\.txt line 2: mixes mask lines \(image_id,mask_path,ignore_path\) with other"),
    ("unknown_id", r"val[/\\]class_labels\.txt line 3: image 'nope\.jpg' is not in image_ids\.txt"),
    ("not_a_number", r"val[/\\]image_sizes\.txt line 1: expected numbers, got '64,wide'"),
])
def test_bad_metadata_is_one_line_naming_file_and_line(cub, case, pattern):
    root, meta, _ = cub
    val, test = meta / "val", meta / "test"
    if case == "missing":
        (val / "image_sizes.txt").unlink()
    elif case == "no_size":
        lines = (val / "image_sizes.txt").read_text().splitlines()
        (val / "image_sizes.txt").write_text("\n".join(lines[:1] + lines[2:]) + "\n")
    elif case == "outside":
        text = (test / "localization.txt").read_text().replace("40,28,62,46", "40,28,65,46", 1)
        (test / "localization.txt").write_text(text)
    elif case == "masks":
        text = (test / "localization.txt").read_text()  # a mask line before the box lines
        (test / "localization.txt").write_text("a.jpg,masks/a.png,ignore/a.png\n" + text)
    elif case == "unknown_id":
        lines = (val / "class_labels.txt").read_text().splitlines()
        (val / "class_labels.txt").write_text("\n".join(lines[:2] + ["nope.jpg,1"] + lines[2:]) + "\n")
    elif case == "not_a_number":
        lines = (val / "image_sizes.txt").read_text().splitlines()
        (val / "image_sizes.txt").write_text("\n".join([lines[0].rsplit(",", 1)[0] + ",wide"] + lines[1:]) + "\n")
    with pytest.raises(AttnlabError, match=pattern) as err:
        load_dataset("wsol", data_dir=root, metadata=meta, image_size=32, cache_dir=None)
    assert "\n" not in str(err.value)


def test_config_keys_and_their_errors(cub, tmp_path):
    root, meta, _ = cub
    cfg = load_config(None, ["data.name=wsol", f"data.data_dir={root}", f"data.metadata={meta}"])
    assert cfg.data.metadata == str(meta)
    with pytest.raises(AttnlabError, match="data.name=wsol needs data.metadata"):
        load_config(None, ["data.name=wsol", f"data.data_dir={root}"])
    with pytest.raises(AttnlabError, match=r"own val split .*set data.val_size=null \(got 50000\)"):
        load_config(Path(__file__).parents[1] / "configs" / "imagenet_resnet50_tdam.yaml",  # holds images out
                    ["data.name=wsol", f"data.data_dir={root}", f"data.metadata={meta}"])
    with pytest.raises(AttnlabError, match="data.metadata is read by data.name=wsol only"):
        load_config(None, ["data.name=cifar10", f"data.metadata={meta}"])
    from attnlab.data.stream import stream_dataset
    streamed = stream_dataset(cfg.data, 0)  # data.pipeline=stream reads the same splits
    assert [len(streamed.train), len(streamed.val), len(streamed.test)] == [6, 3, 3]
    assert streamed.val.files.tolist() == [f.encode() for f in wsol_source("wsol", root, meta).val.files]
    with pytest.raises(AttnlabError, match="own val split"):
        load_dataset("wsol", data_dir=root, metadata=meta, val_size=2, image_size=32, cache_dir=None)
    with open(root / CLASSES[0] / "Black_footed_Albatross_0002.jpg", "wb") as f:  # a val image of another size
        Image.new("RGB", (50, 48)).save(f, format="JPEG")
    with pytest.raises(AttnlabError, match="is 50x48 but image_sizes.txt says 64x48"):
        load_dataset("wsol", data_dir=root, metadata=meta, image_size=32, cache_dir=None)


def _cli(*args):
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    return exc.value.code


def test_train_then_localize_end_to_end(cub, tmp_path, capsys):
    from attnlab.engine.train import train
    root, meta, _ = cub
    cfg = load_config(None, ["name=cub", f"out_dir={tmp_path / 'runs'}", "device=cpu", "model.name=resnet20",
                             "data.name=wsol", f"data.data_dir={root}", f"data.metadata={meta}",
                             "data.image_size=32", f"data.cache_dir={tmp_path / 'c'}", "train.epochs=1",
                             "train.batch_size=4", "train.eval_batch_size=4", "debug.max_steps_per_epoch=1"])
    train(cfg)
    run = tmp_path / "runs" / "cub"
    assert _cli("localize", "--checkpoint", str(run), "--interval", "0.05") == 0
    res = json.loads((run / "localize.json").read_text())
    assert res["dataset"] == "wsol" and res["image_size"] == [32, 32] and res["tau_split"] == "val"
    assert res["splits"]["val"]["images"] == 3 and res["splits"]["test"]["images"] == 3
    assert set(res["priors"]["test"]) == {"centre_gaussian", "full_image"}
    assert "test: centre Gaussian" in capsys.readouterr().out
    out = tmp_path / "pics"  # `attnlab show` reads the same data path (each image's first box drawn)
    assert _cli("show", "--checkpoint", str(run), "--images", "3", "--out", str(out)) == 0
    assert (out / "cams.png").is_file()
