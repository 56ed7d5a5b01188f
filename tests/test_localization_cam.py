"""CAM, Grad-CAM and TDAM per-step maps on tiny real models; the boxes of the real Tiny-ImageNet-50 files."""
import numpy as np
import pytest
import torch

from attnlab.data.boxes import snap_to_pixels, split_boxes
from attnlab.data.datasets import Split
from attnlab.data.sources import open_source
from attnlab.errors import AttnlabError
from attnlab.localization.cam import class_activation_maps, grad_cams, tdam_modules, tdam_step_cams
from attnlab.models import create_model

needs_tiny = pytest.mark.needs_data("tiny-imagenet")


def _model(attention="none", **kw):
    torch.manual_seed(0)
    m = create_model("resnet20", num_classes=7, attention=attention, **kw).eval()
    with torch.no_grad():  # non-trivial BN statistics, so the maps are not dominated by the init
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 1.5)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.2, 0.2)
    return m


def test_cam_is_the_explicit_channel_sum_and_averages_to_the_logit():
    model = _model("se")
    x = torch.randn(3, 3, 32, 32)
    classes = torch.tensor([0, 4, 6])
    maps, logits = class_activation_maps(model, x, classes)
    _, feats = model(x, features="stages")
    a = feats["stages"][-1]
    assert maps.shape == (3, 8, 8)
    for b in range(3):
        want = sum(model.fc.weight[classes[b], k] * a[b, k] for k in range(a.shape[1]))
        assert torch.allclose(maps[b], want, atol=1e-5)
        # GAP + fc head: the map's spatial mean plus the bias is the class logit
        assert torch.allclose(maps[b].mean() + model.fc.bias[classes[b]], logits[b, classes[b]], atol=1e-5)
    top1, _ = class_activation_maps(model, x)  # no classes: each image's top-1 prediction
    assert torch.allclose(top1, class_activation_maps(model, x, logits.argmax(1))[0])
    with pytest.raises(AttnlabError, match="out of range"):
        class_activation_maps(model, x, torch.tensor([0, 1, 7]))


def test_grad_cam_is_relu_of_cam_on_a_gap_fc_head():
    model = _model("cbam")
    x = torch.randn(2, 3, 32, 32)
    classes = torch.tensor([1, 2])
    cam, _ = class_activation_maps(model, x, classes)
    g, _ = grad_cams(model, x, classes)
    assert torch.allclose(g, torch.relu(cam) / 64, atol=1e-6)  # alpha_k = w_ck / (h w), h w = 8 x 8
    assert (cam < 0).any()  # the ReLU really removes something here


def test_tdam_per_step_maps():
    model = _model("tdam", blocks=[2])  # TDAM in the last stage only
    x = torch.randn(2, 3, 32, 32)
    classes = torch.tensor([3, 5])
    steps, step_logits = tdam_step_cams(model, x, classes)
    assert steps.shape == (2, 2, 8, 8) and step_logits.shape == (2, 2, 7)
    # the last step is the model's ordinary CAM, and time_steps is restored afterwards
    cam, logits = class_activation_maps(model, x, classes)
    assert torch.allclose(steps[-1], cam, atol=1e-5) and torch.allclose(step_logits[-1], logits, atol=1e-5)
    assert all(m.time_steps == 2 for m in tdam_modules(model))
    # step 1 has no feedback: the same weights in a plain ResNet-20 give its map
    plain = create_model("resnet20", num_classes=7).eval()
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all(".attn." in k for k in unexpected)
    assert torch.allclose(steps[0], class_activation_maps(plain, x, classes)[0], atol=1e-5)
    assert not torch.allclose(steps[0], steps[1], atol=1e-3)  # the feedback step changes the map
    with pytest.raises(AttnlabError, match="no TDAM"):
        tdam_step_cams(_model("se"), x)


def test_gates_are_captured_without_changing_the_output():
    from attnlab.viz.gates import capture_gates
    x = torch.randn(2, 3, 32, 32)
    for attention, kinds in (("se", {"channel"}), ("eca", {"channel"}), ("cbam", {"channel", "spatial"}),
                             ("spe", {"channel"}), ("dia", {"channel"}), ("tdam", {"channel", "spatial"})):
        model = _model(attention)
        with torch.no_grad():
            ref = model(x)
            with capture_gates(model) as gates:
                out = model(x)
        assert torch.equal(ref, out), attention
        assert {g.kind for g in gates} == kinds, attention
        n_blocks = sum(len(model.stages()[i]) for i in range(3)) if attention != "tdam" else 6
        assert len({g.block for g in gates}) == n_blocks, attention  # DIA's shared unit: one record per block
        for g in gates:
            assert ((g.values >= 0) & (g.values <= 1)).all(), attention  # sigmoids (saturate in float32)
            assert g.values.shape[0] == 2 and g.values.dim() == (2 if g.kind == "channel" else 3)
        if attention == "tdam":
            assert "_spatial" not in vars(model.layer3[0].attn)  # the instance wrapper is gone afterwards
    # SE's gate recomputed by hand for the first block of stage 3
    model = _model("se")
    with torch.no_grad(), capture_gates(model) as gates:
        model(x)
    blk = model.layer3[0]
    with torch.no_grad():
        _, io = model(x, features="blocks")
        u = blk.branch(io["blocks"][6][0])  # the input of layer3.0, the 7th block
        want = blk.attn.fc2(blk.attn.act(blk.attn.fc1(u.mean((2, 3), keepdim=True)))).sigmoid().flatten(1)
    got = [g for g in gates if g.block == "layer3.0"][0].values
    assert torch.allclose(got, want, atol=1e-6)


@needs_tiny
def test_every_tiny_imagenet_box_is_parsed_in_the_image_frame(tiny_imagenet_dir):
    src = open_source("tiny-imagenet")
    lines = (tiny_imagenet_dir / "val" / "val_annotations.txt").read_text().splitlines()
    ann = {line.split("\t")[0]: [float(v) for v in line.split("\t")[2:6]] for line in lines}
    assert len(src.test) == len(lines) == 2500
    for f, box in zip(src.test.files, src.test.boxes):
        assert box.tolist() == ann[f.rsplit("/", 1)[1]]
    for pool in (src.train, src.test):
        b = pool.boxes
        assert np.isfinite(b).all()  # every train image has a box too (the held-out val split needs them)
        assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all() and (b[:, 2] <= 63).all() and (b[:, 3] <= 63).all()
        assert (b[:, 2] >= b[:, 0]).all() and (b[:, 3] >= b[:, 1]).all()


def test_split_boxes_checks_and_snaps():
    images = torch.zeros(3, 3, 32, 32, dtype=torch.uint8)
    boxes = torch.tensor([[0., 0., 31., 31.], [31.5, 11.5, 31., 25.], [2.5, 3., 10.5, 20.]])
    split = Split("val", images, torch.zeros(3, dtype=torch.long), boxes)
    got = split_boxes(split, "tiny-imagenet")
    assert got.tolist() == [[0, 0, 31, 31], [31, 11, 31, 25], [2, 3, 11, 20]]
    assert snap_to_pixels(torch.tensor([[4., 5., 9., 9.]]), (32, 32)).tolist() == [[4, 5, 9, 9]]  # integers kept
    with pytest.raises(AttnlabError, match="has no bounding boxes"):
        split_boxes(Split("test", images, torch.zeros(3, dtype=torch.long)), "cifar10")
    with pytest.raises(AttnlabError, match="no bounding box"):
        split_boxes(Split("val", images, torch.zeros(3, dtype=torch.long), torch.full((3, 4), float("nan"))))
    with pytest.raises(AttnlabError, match="not inside"):
        split_boxes(Split("val", images, torch.zeros(3, dtype=torch.long), boxes + 5))
