"""The Qt-free jobs of :mod:`busseg.jobs` (segment, prompt, prompt region): no viewer needed."""

from __future__ import annotations

import numpy as np
import pytest


def _grey(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def test_widget_module_re_exports_the_jobs():
    pytest.importorskip("magicgui")
    import busseg._widgets._common as common
    import busseg._widgets.segment as seg
    import busseg.jobs as jobs

    for name in ("segment_job", "SegmentResult", "prompt_job", "PromptRequest", "PromptResult",
                 "prompt_region", "slice_crop", "guarded", "WorkerError"):
        assert getattr(seg, name) is getattr(jobs, name), name
    assert common.WorkerError is jobs.WorkerError and common.guarded is jobs.guarded


def test_segment_job_drains_without_a_thread(tiny_checkpoint):
    from busseg.engine import drain
    from busseg.inference import load_model, predict_mask
    from busseg.jobs import SegmentResult, segment_job

    image = _grey((2, 36, 40), seed=1)
    events = []
    res = drain(segment_job(image, rgb=False, checkpoint=tiny_checkpoint, device="cpu",
                              crops=[(30, 32), None]), events.append)
    assert isinstance(res, SegmentResult)
    assert events[0][0] == "status" and events[-1] == ("progress", 2, 2)
    model = load_model(tiny_checkpoint, device="cpu")
    np.testing.assert_array_equal(res.labels[0, :30, :32], predict_mask(image[0, :30, :32], model))
    assert not res.labels[0, 30:].any() and not res.labels[0, :, 32:].any()
    assert res.extra["gated"] == [False, False]


def test_segment_job_refuses_wrong_crops(tiny_checkpoint):
    from busseg.engine import drain
    from busseg.jobs import segment_job

    with pytest.raises(ValueError, match="crops has 1 entries for 2 slices"):
        drain(segment_job(_grey((2, 16, 16)), rgb=False, checkpoint=tiny_checkpoint,
                            device="cpu", crops=[None]))


def test_guarded_turns_runtime_errors_into_worker_errors():
    from busseg.engine import drain
    from busseg.jobs import WorkerError, guarded

    def job():
        yield 1
        raise RuntimeError("CUDA out of memory")

    with pytest.raises(WorkerError, match="RuntimeError: CUDA out of memory"):
        drain(guarded(job()))

    def fine():
        yield 1
        return "done"

    assert drain(guarded(fine())) == "done"


def test_prompt_job_without_prompts_is_an_empty_mask():
    from busseg.jobs import PromptRequest, prompt_job

    req = PromptRequest(data=_grey((20, 24)), index=(), boxes=np.zeros((0, 4)),
                        points=np.zeros((0, 2)), point_labels=np.zeros(0, np.int8),
                        previous_mask=None, changed_boxes=np.zeros((0, 4)),
                        changed_clicks=np.zeros((0, 2)))
    res = prompt_job(req)
    assert res.mask.shape == (20, 24) and not res.mask.any()


def test_prompt_region_box_and_click():
    from busseg.jobs import prompt_region

    old = np.zeros((40, 40), bool)
    old[2:6, 2:6] = True  # a lesion far from the prompts: never touched
    new = np.zeros((40, 40), bool)
    new[20:30, 20:30] = True
    region = prompt_region(old, new, boxes=[(20, 20, 29, 29)], box_margin=0.0)
    assert region[20:30, 20:30].all() and region.sum() == 100
    region = prompt_region(old, new, clicks=[(3, 3)])
    assert region[2:6, 2:6].all() and region.sum() == 16
    assert not prompt_region(old, new, clicks=[(100, 100)]).any()  # outside: ignored


def test_slice_crop():
    from busseg.jobs import slice_crop

    assert slice_crop(None, 0) is None
    assert slice_crop([{"original_shape": [3, 4]}, {}], 0) == (3, 4)
    assert slice_crop([{"original_shape": [3, 4]}, {}], 1) is None
