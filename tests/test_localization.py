"""WSOL box metrics against values worked out by hand, and wsolevaluation's own unit-test vectors (as data)."""
import numpy as np
import pytest

pytest.importorskip("cv2", reason="attnlab[wsol] (opencv-python-headless) not installed")

from attnlab.errors import AttnlabError
from attnlab.localization.metrics import (BoxEvaluator, box_iou, boxes_from_scoremap, iou_curves,
                                          centre_gaussian, max_box_acc, normalize_scoremap, prior_baselines,
                                          select_threshold, summarize, thresholds_grid)

UNIMODAL = np.array([[0, 0, 0, 0, 0], [0, .4, .4, .4, .6], [0, .4, 1, .8, .6], [0, .4, .4, .4, .6]])
MULTIMODAL = np.array([[.4, 0, .2, .2, .2], [.4, .4, 0, .4, 0], [0, 0, 0, .4, 0], [1, .6, .8, .2, .2]])
TAUS = [0, .2, .4, .6, .8]


def test_iou_inclusive_pixels():
    assert box_iou([1, 2, 5, 6], [3, 1, 4, 5])[0, 0] == pytest.approx(8 / 27)  # wsolevaluation's vector
    assert box_iou([3, 1, 4, 5], [3, 1, 4, 5])[0, 0] == 1
    assert box_iou([0, 0, 0, 0], [0, 0, 0, 0])[0, 0] == 1  # a zero box is one pixel, not empty
    assert box_iou([0, 0, 1, 1], [1, 1, 2, 2])[0, 0] == pytest.approx(1 / 7)  # 1 shared pixel of 4 + 4 - 1
    assert box_iou([0, 0, 1, 1], [2, 0, 3, 1])[0, 0] == 0  # touching edges share no pixel
    assert box_iou([[0, 0, 1, 1], [0, 0, 3, 3]], [[0, 0, 3, 3]])[:, 0] == pytest.approx([4 / 16, 1])


def test_largest_contour_boxes_match_wsolevaluation_vectors():
    got = [b.tolist() for b in boxes_from_scoremap(UNIMODAL, TAUS, multi_contour=False)]
    assert got == [[[1, 1, 4, 3]], [[1, 1, 4, 3]], [[2, 1, 4, 3]], [[2, 2, 4, 3]], [[2, 2, 3, 3]]]
    got = [b.tolist() for b in boxes_from_scoremap(MULTIMODAL, TAUS, multi_contour=False)]
    assert got == [[[0, 0, 4, 3]], [[0, 0, 2, 2]], [[0, 3, 3, 3]], [[2, 3, 3, 3]], [[0, 3, 1, 3]]]
    zero = boxes_from_scoremap(np.zeros((4, 5)), TAUS, multi_contour=False)
    assert [b.tolist() for b in zero] == [[[0, 0, 0, 0]]] * 5
    with pytest.raises(AttnlabError, match="NaN"):
        boxes_from_scoremap(np.full((4, 5), np.nan), TAUS)
    with pytest.raises(AttnlabError, match=r"\[0, 1\]"):
        boxes_from_scoremap(UNIMODAL * 2, TAUS)


def test_threshold_is_strict_on_truncated_uint8():
    # u = floor(255 s): 1 -> 255, 0.5 -> 127, 0.499 -> 127, 0.2 -> 51; mask u > floor(tau * 255)
    s = np.array([[1, .5, 0, 0], [0, 0, 0, 0], [0, 0, .2, 0], [0, 0, 0, 0]])
    at = lambda tau: boxes_from_scoremap(s, [tau], multi_contour=True)[0].tolist()
    assert at(0.5) == [[0, 0, 1, 1]]  # floor(127.5) = 127: the 0.5 pixel (127) is NOT above it; +1 past the blob
    assert at(0.49) == [[0, 0, 2, 1]]  # floor(124.95) = 124: both top pixels (255, 127) form one blob
    assert sorted(at(0.19)) == [[0, 0, 2, 1], [2, 2, 3, 3]]  # 0.2 -> 51 > floor(48.45) = 48: a second contour
    assert at(0.2) == [[0, 0, 2, 1]]  # 51 > floor(51.0) = 51 is false: equal to the level is dropped
    assert at(0.999) == [[0, 0, 1, 1]]  # floor(254.745) = 254 < 255: the max pixel always survives tau < 1


def test_boxes_are_clipped_to_the_frame():
    s = np.zeros((4, 5))
    s[2:, 3:] = 1  # a 2x2 blob in the bottom-right corner: boundingRect (3, 2, 2, 2) -> (3, 2, 5, 4) -> clipped
    assert boxes_from_scoremap(s, [0.5])[0].tolist() == [[3, 2, 4, 3]]


def test_v2_scores_every_contour_v1_only_the_largest():
    s = np.zeros((10, 10))
    s[0:4, 0:4] = 1  # big blob, box (0, 0, 4, 4) after the +1 quirk
    s[7:9, 7:9] = 1  # small blob, box (7, 7, 9, 9)
    gt = [[7, 7, 9, 9]]
    multi, single = iou_curves(s, gt, [0.5])
    assert multi[0] == 1  # the small blob's box is exactly the GT
    assert single[0] == 0  # the largest contour is the big blob, disjoint from the GT


def test_contour_area_is_polygon_area_not_pixel_count():
    s = np.zeros((8, 8))
    s[1, 1] = 1  # a single pixel: polygon area 0
    s[4:6, 4:7] = 1  # 2 x 3 pixels: polygon area 1 x 2 = 2 -> the largest
    assert boxes_from_scoremap(s, [0.5], multi_contour=False)[0].tolist() == [[4, 4, 7, 6]]


def test_dedup_of_thresholds_equals_the_full_grid():
    rng = np.random.default_rng(0)
    small = rng.random((4, 4)).astype(np.float32)
    s = normalize_scoremap(small, (16, 16))
    gt = [[3, 2, 11, 12]]
    taus = thresholds_grid(0.001)
    multi, single = iou_curves(s, gt, taus)
    want_multi = [box_iou(b, gt).max() for b in boxes_from_scoremap(s, taus, True)]
    want_single = [box_iou(b, gt).max() for b in boxes_from_scoremap(s, taus, False)]
    assert np.allclose(multi, want_multi) and np.allclose(single, want_single)


def test_grid_covers_zero_to_one_exclusive():
    assert thresholds_grid(0.25).tolist() == [0, .25, .5, .75]
    assert len(thresholds_grid(0.001)) == 1000 and thresholds_grid(0.001)[-1] < 1
    with pytest.raises(AttnlabError, match="interval"):
        thresholds_grid(0)


def test_normalize_resizes_then_min_max():
    cam = np.array([[0., 1.], [2., 10.]], dtype=np.float32)
    s = normalize_scoremap(cam, (8, 8))
    assert s.shape == (8, 8) and s.min() == 0 and s.max() == 1  # bicubic overshoot removed by normalising after
    assert np.argmax(s) == 63 and np.argmin(s) == 0
    assert not normalize_scoremap(np.full((2, 2), 3.0), (4, 4)).any()  # constant -> zeros
    assert not normalize_scoremap(np.array([[np.nan, 1], [0, 0]]), (4, 4)).any()  # NaN -> zeros
    # monotone rescale of the CAM leaves the score map (hence every metric) unchanged
    assert np.allclose(normalize_scoremap(3 * cam - 7, (8, 8)), s, atol=1e-6)


def test_max_box_acc_each_delta_takes_its_own_tau():
    taus = np.array([0, .5])
    iou = np.array([[0.35, 0.8], [0.35, 0.2], [0.6, 0.55], [0.1, 0.72]])  # 4 images x 2 thresholds
    res = max_box_acc(iou, taus)
    assert res[30] == (75.0, 0.0)  # tau 0: .35 .35 .6 -> 3/4; tau .5: .8 .55 .72 -> 3/4; tie -> smaller tau
    assert res[50] == (75.0, 0.5)  # tau 0: 1/4; tau .5: 3/4
    assert res[70] == (50.0, 0.5)  # tau 0: 0; tau .5: .8 .72 -> 2/4
    out = summarize(iou, iou, taus)
    assert out["max_box_acc_v2"] == pytest.approx((75 + 75 + 50) / 3) and out["max_box_acc"] == 75.0


def test_loc_metrics_at_chosen_and_oracle_tau():
    taus = np.array([0, .5])
    single = np.array([[0.6, 0.4], [0.6, 0.9], [0.2, 0.7], [0.1, 0.9]])  # GT-known: tau 0 -> 2/4, tau .5 -> 3/4
    top1 = np.array([True, False, True, False])
    top5 = np.array([True, True, True, False])
    out = summarize(single, single, taus, top1, top5, tau=0.0)
    assert out["tau"] == 0.0
    assert out["gt_known_loc"] == {"oracle": 75.0, "oracle_tau": 0.5, "at_tau": 50.0}
    assert out["top1_loc"] == {"oracle": 25.0, "oracle_tau": 0.0, "at_tau": 25.0}  # tau 0: img 0; tau .5: img 2
    assert out["top5_loc"] == {"oracle": 50.0, "oracle_tau": 0.0, "at_tau": 50.0}  # tau 0: imgs 0, 1; .5: 1, 2
    for key in ("top1_loc", "top5_loc"):
        assert out[key]["oracle"] <= out["gt_known_loc"]["oracle"]
    assert out["top1_loc"]["at_tau"] <= min(100 * top1.mean(), out["gt_known_loc"]["at_tau"])
    assert select_threshold(single, taus) == (1, 0.5)


def test_evaluator_accumulates_images():
    ev = BoxEvaluator(thresholds=[0.5])
    s = np.zeros((2, 6, 6))
    s[0, 1:3, 1:3] = 1
    s[1, 3:5, 3:5] = 1
    ev.add(s, np.array([[1, 1, 3, 3], [0, 0, 5, 5]]))
    multi, single = ev.curves()
    assert len(ev) == 2 and multi.shape == (2, 1)
    assert multi[:, 0].tolist() == pytest.approx([1, 9 / 36])  # box (3, 3, 5, 5): 9 pixels of the 36-pixel GT
    with pytest.raises(AttnlabError, match="box sets"):
        ev.add(s, np.zeros((1, 4)))


def test_priors_full_image_box_and_centre_gaussian():
    taus = thresholds_grid(0.01)
    gt = np.array([[0, 0, 7, 7], [0, 0, 3, 3], [2, 2, 5, 5], [0, 0, 7, 5]])
    pri = prior_baselines(gt, (8, 8), taus)
    full = pri["full_image"]
    # IoU with (0, 0, 7, 7): 1, 16/64, 16/64, 48/64 -> >= .3: 2/4, >= .5: 2/4, >= .7: 2/4
    assert full["iou"] == {"30": 50.0, "50": 50.0, "70": 50.0} and full["gt_known_loc"] == 50.0
    g = pri["centre_gaussian"]
    # tau = 0 keeps all but the Gaussian's four corners (exactly 0 after min-max): one contour whose box is the
    # frame, so the Gaussian's MaxBoxAcc can never fall below the full-image box at any delta
    for d in ("30", "50", "70"):
        assert g["max_box_acc_v2_iou"][d] >= full["iou"][d]
    assert boxes_from_scoremap(centre_gaussian((8, 8)), [0.0])[0].tolist() == [[0, 0, 7, 7]]
    assert g["tau"] is not None and g["gt_known_loc"]["at_tau"] == g["gt_known_loc"]["oracle"]  # tau chosen here


def test_scoring_a_large_split_shows_its_progress_in_quarters(capsys):
    """localize walks each split in batches; from a thousand images on it says how far it is (pytest's stderr is
    not a terminal, so plain lines, one per quarter)."""
    import torch
    from types import SimpleNamespace
    from attnlab.data.datasets import Split
    from attnlab.localization.command import batches
    split = Split(name="val", images=torch.zeros(1000, 3, 4, 4, dtype=torch.uint8),
                  labels=torch.arange(1000) % 10)
    bundle = SimpleNamespace(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    seen = [(start, len(y)) for start, _, y in batches(torch.nn.Linear(1, 1), split, bundle, batch_size=250)]
    assert seen == [(0, 250), (250, 250), (500, 250), (750, 250)]
    assert capsys.readouterr().err.splitlines() == [f"localize val: scored {n}/1000 images"
                                                     for n in (250, 500, 750, 1000)]
