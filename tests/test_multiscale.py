"""The authors' MMDetection multi-scale training augmentation (piip.data.multiscale).

Expected numbers are written by hand from MMDetection 2.x / mmcv semantics; the mask index lists
were produced by OpenCV 4.14 ``cv2.resize(..., interpolation=cv2.INTER_NEAREST)`` (what mmcv's
``'nearest'`` calls) on images whose pixels hold their own row or column index.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from piip.data.multiscale import (MultiScaleCrop, crop, multiscale_scales, nearest_index, rescale_size,
                                  resize_keep_ratio)

R16 = 1 / 16  # crop_size 40 with ratio 1/16: scales small enough for 60x80 test images
SMALL_RESIZE = ((30, 83), (32, 83), (34, 83), (36, 83), (38, 83), (40, 83), (42, 83), (44, 83), (46, 83),
                (48, 83), (50, 83))


def assert_boxes(actual, expected):
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=torch.float32).reshape(-1, 4),
                               rtol=0, atol=1e-4)


def position_masks(h=60, w=80, n=3):
    """Object 0's mask holds each pixel's row index, object 1's its column index, the rest zeros."""
    masks = torch.zeros((n, h, w), dtype=torch.uint8)
    masks[:1] = torch.arange(h, dtype=torch.uint8)[:, None]
    masks[1:2] = torch.arange(w, dtype=torch.uint8)[None, :]
    return masks


def sample(boxes, h=60, w=80, masks=True):
    n = len(boxes)
    target = {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
              "labels": torch.arange(1, n + 1, dtype=torch.int64),
              "has_mask": torch.tensor([True, False, True, False][:n] + [True] * max(n - 4, 0)),
              "iscrowd": torch.zeros(n, dtype=torch.int64),
              "area": torch.arange(10, 10 * n + 1, 10, dtype=torch.float32),
              "image_id": 42}
    if masks:
        target["masks"] = position_masks(h, w, n)
    return torch.rand(3, h, w, generator=torch.Generator().manual_seed(0)), target


def snapshot(target):
    return {k: v.clone() if torch.is_tensor(v) else v for k, v in target.items()}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k], k


class Scripted(MultiScaleCrop):
    """Fixed draws, each checked to be one the real method could make; records the calls."""

    def __init__(self, crop_size, ratio=None, *, policy, scales, crops):
        super().__init__(crop_size, ratio)
        self.policy, self.scale_queue, self.crop_queue, self.calls = policy, list(scales), list(crops), []

    def choose_policy(self):
        return self.policy

    def choose_scale(self, scales):
        scale = self.scale_queue.pop(0)
        assert scale in scales
        self.calls.append(("scale", scales))
        return scale

    def choose_crop(self, height, width, size_range):
        top, left, crop_h, crop_w = self.crop_queue.pop(0)
        low, high = size_range
        assert min(height, low) <= crop_h <= min(height, high) and min(width, low) <= crop_w <= min(width, high)
        assert 0 <= top <= height - crop_h and 0 <= left <= width - crop_w
        self.calls.append(("crop", height, width, size_range))
        return top, left, crop_h, crop_w


# -- the scale lists --------------------------------------------------------------------------------
def test_scale_lists_of_the_authors_configs():
    s = multiscale_scales(1.0)
    assert s.resize == ((480, 1333), (512, 1333), (544, 1333), (576, 1333), (608, 1333), (640, 1333),
                        (672, 1333), (704, 1333), (736, 1333), (768, 1333), (800, 1333))
    assert s.crop_resize == ((400, 1333), (500, 1333), (600, 1333))
    assert s.crop_range == (384, 600)
    # r = 1792/1024 = 1.75: int(480*1.75) = 840, int(1333*1.75) = int(2332.75) = 2332, ...
    s = multiscale_scales(1792 / 1024)
    assert s.resize == ((840, 2332), (896, 2332), (952, 2332), (1008, 2332), (1064, 2332), (1120, 2332),
                        (1176, 2332), (1232, 2332), (1288, 2332), (1344, 2332), (1400, 2332))
    assert s.crop_resize == ((700, 2332), (875, 2332), (1050, 2332))
    assert s.crop_range == (672, 1050)
    # truncation, not rounding: 500/16 = 31.25, 600/16 = 37.5, 1333/16 = 83.3125
    s = multiscale_scales(R16)
    assert s.resize == SMALL_RESIZE and s.crop_resize == ((25, 83), (31, 83), (37, 83)) and s.crop_range == (24, 37)


def test_ratio_defaults_to_crop_size_over_1024():
    assert MultiScaleCrop(1024).ratio == 1.0 and MultiScaleCrop(1024).scales == multiscale_scales(1.0)
    t = MultiScaleCrop(1792)
    assert t.ratio == 1.75 and t.crop_size == 1792 and t.scales.resize[0] == (840, 2332)
    assert MultiScaleCrop(40, R16).scales.resize == SMALL_RESIZE
    for bad in (0, -3, 1.5, True):
        with pytest.raises(ValueError, match="crop_size"):
            MultiScaleCrop(bad)
    with pytest.raises(ValueError, match="too small"):
        MultiScaleCrop(40, 1 / 400)  # int(384/400) = 0


# -- resize ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("hw, scale, expected", [
    ((480, 640), (800, 1333), (800, 1067)),   # sf = min(1333/640, 800/480) = 5/3: 640*5/3 = 1066.67 -> 1067
    ((480, 640), (1333, 800), (800, 1067)),   # the order of the scale's numbers does not matter
    ((300, 1000), (800, 1333), (400, 1333)),  # long side binds: sf = 1.333, 300*1.333 = 399.9 -> 400
    ((1000, 300), (800, 1333), (1333, 400)),  # portrait
    ((1200, 1600), (480, 1333), (480, 640)),  # sf = min(0.833, 0.4) = 0.4
    ((2, 3), (3, 100), (3, 5)),               # sf = 1.5: 3*1.5 = 4.5 -> int(5.0) = 5 (round() would give 4)
    ((60, 80), (44, 83), (44, 59)),           # sf = 44/60: 80*0.7333 = 58.67 -> 59
])
def test_rescale_size_is_mmcv(hw, scale, expected):
    assert rescale_size(*hw, scale) == expected


def test_nearest_index_is_opencv_inter_nearest():
    # cv2.resize of a 1x6 row to 1x34 with INTER_NEAREST
    expected = [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 4, 4, 4, 4, 4, 4, 5, 5,
                5, 5, 5]
    assert nearest_index(6, 34).tolist() == expected
    # torch's own nearest differs there (17 * 6/34 = 3 exactly: float32 lands on 3, OpenCV's double on 2)
    torch_nearest = F.interpolate(torch.arange(6.0)[None, None, None], size=(1, 34), mode="nearest")
    assert torch_nearest.flatten().long().tolist()[17] == 3 and expected[17] == 2
    assert nearest_index(4, 2).tolist() == [0, 2] and nearest_index(3, 3).tolist() == [0, 1, 2]
    # and the masks of a resize follow it: 6x9 to (34, 100): sf = min(100/9, 34/6) = 5.67 -> 34x51
    image, target = sample([[1, 1, 8, 5], [0, 0, 9, 6]], h=6, w=9)
    _, out = resize_keep_ratio(image, target, (34, 100))
    assert out["masks"].shape == (2, 34, 51) and out["masks"][0, :, 0].tolist() == expected


def test_resize_boxes_masks_and_image():
    image, target = sample([[10, 6, 50, 30], [70, 50, 85, 65]])
    before = snapshot(target)
    out_image, out = resize_keep_ratio(image, target, (37, 83))
    # sf = min(83/80, 37/60) = 0.6167: 80*0.6167 = 49.33 -> int(49.83) = 49, 60 -> 37; box factors 49/80, 37/60
    assert out_image.shape == (3, 37, 49) and out["masks"].shape == (2, 37, 49)
    assert_boxes(out["boxes"], [[6.125, 3.7, 30.625, 18.5],
                                [42.875, 30.833333, 49, 37]])  # 85*0.6125 = 52.1 and 65*37/60 = 40.1 clipped
    torch.testing.assert_close(out_image, F.interpolate(image[None], size=(37, 49), mode="bilinear",
                                                        align_corners=False)[0], rtol=0, atol=0)
    rows = [math.floor(i * (1 / (37 / 60))) for i in range(37)]
    cols = [math.floor(j * (1 / (49 / 80))) for j in range(49)]
    assert out["masks"][0, :, 0].tolist() == rows and out["masks"][1, 0, :].tolist() == cols
    assert rows[:6] == [0, 1, 3, 4, 6, 8] and cols[:6] == [0, 1, 3, 4, 6, 8]
    assert torch.equal(out["labels"], target["labels"]) and torch.equal(out["has_mask"], target["has_mask"])
    assert out is not target and out["image_id"] == 42
    assert_same(target, before)


# -- crop -----------------------------------------------------------------------------------------
def test_crop_shifts_clips_and_drops_every_per_object_field():
    boxes = [[6, 5, 10, 9],       # inside: [1, 1, 5, 5]
             [0, 0, 5, 20],       # ends on the crop's left edge: zero width, dropped
             [16, 13, 16.5, 30],  # 0.5 wide after clipping: kept (MMDetection keeps width > 0)
             [17, 14, 29, 19],    # starts on the right edge (x = 5 + 12): zero width, dropped
             [2, 2, 29, 19]]      # covers the crop: clipped to it
    image, target = sample(boxes, h=20, w=30)
    target["orig_size"] = torch.tensor([20, 30, 0, 0, 0])  # an image-level key of length N: not filtered
    before = snapshot(target)
    out_image, out = crop(image, target, top=4, left=5, height=10, width=12)
    assert_boxes(out["boxes"], [[1, 1, 5, 5], [11, 9, 11.5, 10], [0, 0, 12, 10]])
    assert out["labels"].tolist() == [1, 3, 5]
    assert out["has_mask"].tolist() == [True, True, True] and before["has_mask"].tolist()[1::2] == [False, False]
    assert out["area"].tolist() == [10.0, 30.0, 50.0] and out["iscrowd"].tolist() == [0, 0, 0]
    assert torch.equal(out["masks"], target["masks"][[0, 2, 4], 4:14, 5:17])
    assert torch.equal(out_image, image[:, 4:14, 5:17]) and out_image.is_contiguous()
    assert out["image_id"] == 42 and torch.equal(out["orig_size"], before["orig_size"])
    assert_same(target, before)


def test_crop_of_an_image_without_objects_left():
    image, target = sample([[0, 0, 4, 4], [50, 40, 60, 50]], h=60, w=80)
    out_image, out = crop(image, target, top=10, left=10, height=20, width=30)
    assert out_image.shape == (3, 20, 30)
    assert out["boxes"].shape == (0, 4) and out["boxes"].dtype == torch.float32
    assert out["masks"].shape == (0, 20, 30) and out["masks"].dtype == torch.uint8
    assert out["labels"].shape == (0,) and out["has_mask"].shape == (0,) and out["area"].shape == (0,)


# -- the whole transform, draws fixed -------------------------------------------------------------
def test_policy_resize_crop_resize_then_crop_by_hand():
    image, target = sample([[10, 6, 50, 30], [60, 40, 78, 58], [0, 0, 4, 4]])
    before = snapshot(target)
    t = Scripted(40, R16, policy=1, scales=[(37, 83), (50, 83)], crops=[(5, 8, 30, 34), (10, 17, 40, 40)])
    out_image, out = t(image, target)
    # 1. (37, 83): 60x80 -> 37x49 (see test_resize...), factors 49/80 = 0.6125, 37/60:
    #    A [6.125, 3.7, 30.625, 18.5], B [36.75, 24.67, 47.775, 35.77], C [0, 0, 2.45, 2.47]
    # 2. crop top 5, left 8, 30x34: A [0, 0, 22.625, 13.5], B [28.75, 19.67, 34, 30], C [0, 0, 0, 0]: dropped
    # 3. (50, 83): sf = min(83/34, 50/30) = 5/3: 34*5/3 = 56.67 -> int(57.17) = 57, 30x34 -> 50x57,
    #    factors 57/34, 50/30: A [0, 0, 37.93, 22.5], B [48.199, 32.78, 57, 50]
    # 4. crop 40x40 (min(50, 40), min(57, 40)) at top 10, left 17
    assert t.calls == [("scale", t.scales.crop_resize), ("crop", 37, 49, (24, 37)),
                       ("scale", t.scales.resize), ("crop", 50, 57, (40, 40))]
    assert out_image.shape == (3, 40, 40)
    assert_boxes(out["boxes"], [[0, 0, 20.930147, 12.5], [31.198529, 22.777778, 40, 40]])
    assert out["labels"].tolist() == [1, 2] and out["has_mask"].tolist() == [True, False]
    assert out["area"].tolist() == [10.0, 20.0] and out["image_id"] == 42
    # masks: the source row / column of each output pixel, by OpenCV
    assert out["masks"].shape == (2, 40, 40)
    assert out["masks"][0, :, 0].tolist() == [17, 17, 19, 19, 21, 22, 22, 24, 24, 25, 27, 27, 29, 29, 30, 32, 32,
                                              34, 34, 35, 37, 37, 38, 38, 40, 42, 42, 43, 43, 45, 47, 47, 48, 48,
                                              50, 51, 51, 53, 53, 55]
    assert out["masks"][1, 0, :].tolist() == [29, 29, 31, 31, 32, 34, 34, 35, 35, 37, 39, 39, 40, 40, 42, 44, 44,
                                              45, 45, 47, 48, 48, 50, 50, 52, 53, 53, 55, 55, 57, 58, 58, 60, 60,
                                              62, 63, 63, 65, 65, 66]
    assert (out["masks"][0] == out["masks"][0, :, :1]).all() and (out["masks"][1] == out["masks"][1, :1]).all()
    expected = F.interpolate(image[None], size=(37, 49), mode="bilinear", align_corners=False)[:, :, 5:35, 8:42]
    expected = F.interpolate(expected, size=(50, 57), mode="bilinear", align_corners=False)[0, :, 10:50, 17:57]
    assert torch.equal(out_image, expected)
    assert_same(target, before)


def test_policy_resize_then_crop_by_hand():
    image, target = sample([[10, 6, 50, 30], [60, 40, 78, 58], [0, 0, 4, 4]])
    t = Scripted(40, R16, policy=0, scales=[(44, 83)], crops=[(4, 19, 40, 40)])
    out_image, out = t(image, target)
    # (44, 83): 60x80 -> 44x59, box factors 59/80 = 0.7375, 44/60; then 40x40 at top 4, left 19
    assert t.calls == [("scale", t.scales.resize), ("crop", 44, 59, (40, 40))]
    assert out_image.shape == (3, 40, 40)
    assert_boxes(out["boxes"], [[0, 0.4, 17.875, 18], [25.25, 25.333333, 38.525, 38.533333]])
    assert out["labels"].tolist() == [1, 2] and out["masks"].shape == (2, 40, 40)  # C ([0, 0, 2.95, 2.93]) dropped
    assert out["masks"][0, :, 0].tolist() == [5, 6, 8, 9, 10, 12, 13, 15, 16, 17, 19, 20, 21, 23, 24, 25, 27, 28,
                                              30, 31, 32, 34, 35, 36, 38, 39, 40, 42, 43, 45, 46, 47, 49, 50, 51,
                                              53, 54, 55, 57, 58]
    assert out["masks"][1, 0, :].tolist() == [25, 27, 28, 29, 31, 32, 33, 35, 36, 37, 39, 40, 42, 43, 44, 46, 47,
                                              48, 50, 51, 52, 54, 55, 56, 58, 59, 61, 62, 63, 65, 66, 67, 69, 70,
                                              71, 73, 74, 75, 77, 78]


@pytest.mark.parametrize("policy, scales, crops, size", [
    (0, [(44, 83)], [(4, 19, 40, 40)], (40, 40)),
    (1, [(37, 83), (50, 83)], [(5, 8, 30, 36), (10, 20, 40, 40)], (40, 40)),
])
def test_every_object_cropped_away(policy, scales, crops, size):
    image, target = sample([[0, 0, 4, 4]])  # gone after the first crop of either policy
    out_image, out = Scripted(40, R16, policy=policy, scales=scales, crops=crops)(image, target)
    assert out_image.shape == (3, *size)
    assert out["boxes"].shape == (0, 4) and out["masks"].shape == (0, *size) and out["masks"].dtype == torch.uint8
    assert out["labels"].shape == (0,) and out["has_mask"].shape == (0,) and out["iscrowd"].shape == (0,)
    assert out["image_id"] == 42


# -- the whole transform, random draws ------------------------------------------------------------
class Recorded(MultiScaleCrop):
    def __init__(self, *args):
        super().__init__(*args)
        self.draws = []

    def choose_policy(self):
        self.draws.append(("policy", super().choose_policy()))
        return self.draws[-1][1]

    def choose_scale(self, scales):
        self.draws.append(("scale", super().choose_scale(scales)))
        return self.draws[-1][1]

    def choose_crop(self, height, width, size_range):
        window = super().choose_crop(height, width, size_range)
        self.draws.append(("crop", (height, width, size_range), window))
        return window


def reference(h, w, boxes, draws, crop_size, scales):
    """MMDetection's arithmetic in NumPy float32, replaying the recorded draws."""
    draws = list(draws)
    boxes = np.asarray(boxes, dtype=np.float32)
    keep = np.arange(len(boxes))

    def resize(h, w, boxes, scale):
        sf = min(max(scale) / max(h, w), min(scale) / min(h, w))
        nh, nw = int(h * sf + 0.5), int(w * sf + 0.5)
        boxes = boxes * np.array([nw / w, nh / h, nw / w, nh / h], dtype=np.float32)
        boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, nw)
        boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, nh)
        return nh, nw, boxes

    def random_crop(h, w, boxes, keep, size_range):
        kind, args, (top, left, ch, cw) = draws.pop(0)
        lo, hi = size_range
        assert kind == "crop" and args == (h, w, size_range)
        assert min(h, lo) <= ch <= min(h, hi) and min(w, lo) <= cw <= min(w, hi)
        assert 0 <= top <= h - ch and 0 <= left <= w - cw
        boxes = boxes - np.array([left, top, left, top], dtype=np.float32)
        boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, cw)
        boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, ch)
        valid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        return ch, cw, boxes[valid], keep[valid]

    kind, policy = draws.pop(0)
    assert kind == "policy"
    if policy == 1:
        kind, scale = draws.pop(0)
        assert scale in scales.crop_resize
        h, w, boxes = resize(h, w, boxes, scale)
        h, w, boxes, keep = random_crop(h, w, boxes, keep, scales.crop_range)
    kind, scale = draws.pop(0)
    assert scale in scales.resize
    h, w, boxes = resize(h, w, boxes, scale)
    h, w, boxes, keep = random_crop(h, w, boxes, keep, (crop_size, crop_size))
    assert not draws
    return (h, w), boxes, keep


@pytest.mark.parametrize("masks", [True, False])
def test_random_draws_against_a_replayed_reference(masks):
    boxes = [[10, 6, 50, 30], [60, 40, 78, 58], [0, 0, 4, 4], [30, 25, 34, 33]]
    image, target = sample(boxes, masks=masks)
    before = snapshot(target)
    policies, dropped = set(), 0
    for seed in range(30):
        t = Recorded(40, R16)
        torch.manual_seed(seed)
        out_image, out = t(image, target)
        torch.manual_seed(seed)
        again_image, again = MultiScaleCrop(40, R16)(image, target)
        assert torch.equal(out_image, again_image) and torch.equal(out["boxes"], again["boxes"])
        size, ref_boxes, keep = reference(60, 80, boxes, t.draws, 40, t.scales)
        policies.add(t.draws[0][1])
        dropped += len(boxes) - len(keep)
        h, w = out_image.shape[-2:]
        assert (h, w) == size and h <= 40 and w <= 40
        torch.testing.assert_close(out["boxes"], torch.from_numpy(ref_boxes), rtol=0, atol=1e-5)
        assert (out["boxes"][:, 0::2] <= w).all() and (out["boxes"][:, 1::2] <= h).all() and (out["boxes"] >= 0).all()
        assert out["labels"].tolist() == (keep + 1).tolist()
        assert out["has_mask"].tolist() == [[True, False, True, False][k] for k in keep]
        assert ("masks" in out) == masks
        if masks:
            assert out["masks"].shape == (len(keep), h, w)
    assert policies == {0, 1} and dropped > 0
    assert_same(target, before)


def test_draws_cover_exactly_the_mmdet_ranges():
    t = MultiScaleCrop(40, R16)
    torch.manual_seed(0)
    windows = [t.choose_crop(10, 3, (4, 6)) for _ in range(1500)]
    # crop_h uniform in [min(10, 4), min(10, 6)] = 4..6, crop_w = min(3, .) = 3 (the image is narrower)
    assert {w[2] for w in windows} == {4, 5, 6} and {w[3] for w in windows} == {3}
    for crop_h in (4, 5, 6):  # the offset takes every value 0..10 - crop_h, the last one included
        assert {w[0] for w in windows if w[2] == crop_h} == set(range(10 - crop_h + 1))
    assert {w[1] for w in windows} == {0}
    assert {t.choose_crop(50, 45, (40, 40))[2:] for _ in range(20)} == {(40, 40)}  # the final crop: min(h, C)
    assert {t.choose_policy() for _ in range(100)} == {0, 1}
    assert {t.choose_scale(t.scales.resize) for _ in range(400)} == set(SMALL_RESIZE)
