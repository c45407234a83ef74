"""The detection planner's upper-bound step (abnexp.memory.detection) against real CPU steps:
torchvision's own training forward on demo COCO images stays below it, and the upper-bound
step itself run on real tensors peaks where the fake-tensor simulation says; the planned image
size (memory.image_size, COCO's by default) is what the detector's transform feeds the backbone."""
from __future__ import annotations

import pytest
import torch

from abnexp.config import compose
from abnexp.memory import Simulator
from abnexp.report.memory_report import format_plan, plan_for, step_spec
from abnexp.tasks import build_task
from test_memory_simulate import real_peak

pytestmark = pytest.mark.slow  # real Mask R-CNN steps on the CPU
pytest.importorskip("pycocotools")

# the demo's own 128 px images, a ResNet-18 body and small RPN / RoI counts: a CPU step takes about a second
SMALL = ["task=detection", "head=mask_rcnn_fpn", "model=resnet18", "data.batch_size=2", "data.min_size=128",
         "data.max_size=128", "head.rpn_pre_nms_top_n_train=400", "head.rpn_post_nms_top_n_train=100",
         "head.box_batch_size_per_image=64"]


def _demo_batch(cfg, count: int):
    train, _ = build_task(cfg).datasets()
    images, targets = zip(*(train[i] for i in range(count)))
    return list(images), [dict(t) for t in targets]


@pytest.mark.parametrize("norm", ["bn", "cbn"])
def test_real_steps_on_demo_coco_stay_below_the_upper_bound(demo_cache, norm):
    cfg = compose([*SMALL, f"norm={norm}"])
    images, targets = _demo_batch(cfg, 2)
    instances = max(len(t["labels"]) for t in targets)
    cfg = compose([*SMALL, f"norm={norm}", f"memory.gt_instances={instances}"])
    bound = Simulator(step_spec(cfg)).step(2, 128).tensor_peak_bytes

    def real_inputs():
        return [im.clone() for im in images], [{k: v.clone() if torch.is_tensor(v) else v for k, v in t.items()}
                                              for t in targets]

    measured = real_peak(step_spec(cfg, simulated=False), 2, 128, make_inputs=real_inputs)
    assert measured <= bound, (measured, bound)
    assert measured >= 0.5 * bound, (measured, bound)  # a bound of the same step, not a loose one


def test_the_upper_bound_step_peaks_where_its_simulation_says():
    # the fake-tensor accounting of the upper-bound step against the same step on real tensors
    cfg = compose([*SMALL, "norm=bn"])
    spec = step_spec(cfg)
    simulated = Simulator(spec).step(2, 128)
    torch.manual_seed(0)
    measured = real_peak(spec, 2, 128)
    assert abs(simulated.tensor_peak_bytes - measured) <= 0.02 * measured, (simulated.tensor_peak_bytes, measured)


@pytest.mark.parametrize("overrides, height, width", [
    ([], 800, 1333),  # COCO's training scale by default, though task=detection composes the 128 px demo data
    (["memory.image_size=null"], 128, 128),  # the data config's own data.min_size / data.max_size
    (["memory.image_size=[480,640]", "memory.crop=240"], 240, 320),  # memory.crop: the shorter side, cap scaled
])
def test_planned_image_size(overrides, height, width):
    cfg = compose(["task=detection", "head=mask_rcnn_fpn", "model=resnet18", "norm=bn", "data.batch_size=2",
                   "memory.gt_instances=2", "head.rpn_pre_nms_top_n_train=16", "head.rpn_post_nms_top_n_train=8",
                   "head.box_batch_size_per_image=8", *overrides])
    r = plan_for(cfg, search=False)
    assert r["image"] == f"{height}×{width}" and f"images of {height}×{width}" in format_plan(r)
    # torchvision's transform keeps an image already at its scale and pads it to a multiple of 32; the stem
    # conv (stride 2, 64 channels) output, float32, is kept for BatchNorm's backward
    padded = [-(-side // 32) * 32 for side in (height, width)]
    assert dict(r["top_modules"]).get("backbone.body.conv1") == 2 * 64 * (padded[0] // 2) * (padded[1] // 2) * 4
