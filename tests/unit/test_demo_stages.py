"""How the demo splits a job's time from submit to completed into queue wait, boot, execution and publish."""

from __future__ import annotations

import pytest

from gpuctl.services.demo import stage_seconds


def test_a_job_that_started_the_box_waits_mostly_for_the_boot() -> None:
    """Created at 0, box booting 0.2 → 4.2, claimed at 4.4, ran 4.5 → 6.5, completed at 6.6."""
    stages = stage_seconds(created=0.0, claimed=4.4, ran=(4.5, 6.5), finished=6.6, boot=(0.2, 4.2))
    assert stages == pytest.approx({"queue_wait": 0.5, "boot": 4.0, "execution": 2.0, "publish": 0.1})


def test_the_stages_add_up_to_the_time_from_created_to_completed() -> None:
    """A second job behind the first one in ComfyUI's queue: its wait there is queue wait, not execution."""
    stages = stage_seconds(created=0.1, claimed=4.4, ran=(6.5, 8.4), finished=8.5, boot=(0.2, 4.2))
    assert stages["boot"] == pytest.approx(4.0)
    assert stages["queue_wait"] == pytest.approx(2.4)
    assert sum(v for v in stages.values() if v is not None) == pytest.approx(8.5 - 0.1)


@pytest.mark.parametrize("boot", [(None, None), (-20.0, -15.0)], ids=["no-boot", "booted-before"])
def test_no_boot_time_when_the_box_was_already_up(boot: tuple[float | None, float | None]) -> None:
    """A job submitted to a box that was up (or never booted) spent nothing waiting for a boot."""
    stages = stage_seconds(created=0.0, claimed=0.3, ran=(0.4, 2.4), finished=2.5, boot=boot)
    assert stages == pytest.approx({"queue_wait": 0.4, "boot": 0.0, "execution": 2.0, "publish": 0.1})


def test_unseen_execution_leaves_execution_and_publish_unknown() -> None:
    """When ComfyUI's queue was not seen, the wait runs to the claim and the rest is unknown, not guessed."""
    stages = stage_seconds(created=0.0, claimed=1.0, ran=(None, None), finished=3.0, boot=(None, None))
    assert stages == {"queue_wait": 1.0, "boot": 0.0, "execution": None, "publish": None}


def test_the_json_document_names_every_stage_and_the_box() -> None:
    """`gpuctl demo --output json`: each job's stages in seconds (None when not observed), the box's boot."""
    from pathlib import Path

    from gpuctl.services.demo import DemoJob, DemoResult
    from gpuctl.services.local import BoxView

    # GIVEN a demo that started from an off box, one job fully timed and one whose execution was not seen
    box = BoxView("up", "i-1", "running", 10.0, 2.0, "", "http://127.0.0.1:1", False, 300.0,
                  boot_started_at=10.0, up_at=14.123, boot_seconds=4.123)
    timed = DemoJob("camera-angle", "a", 0.1234, queue_wait_s=0.5, boot_s=4.0, execution_s=2.0, publish_s=0.05,
                    download_s=0.04, status="completed", result_url="s3://b/a.png", path=Path("/o/camera-angle.png"))
    unseen = DemoJob("qwen-image-edit", "b", 0.05, queue_wait_s=None, boot_s=0.0, status="completed")
    result = DemoResult(Path("/o"), jobs=[timed, unseen], up_s=6.0, down_s=1.2, total_s=17.456, box_before="off",
                        box=box)

    # WHEN it is rendered as JSON
    doc = result.document()

    # THEN the stages, the box and the totals are there, rounded; what was not seen is null
    assert doc["gpu_box"] == {"before": "off", "boot_seconds": 4.12, "boot_delay_seconds": 2.0}
    assert doc["seconds"] == {"up": 6.0, "down": 1.2, "total": 17.46}
    assert doc["jobs"][0] == {"job_type": "camera-angle", "job_id": "a", "status": "completed",
                              "result_s3_uri": "s3://b/a.png", "file": "/o/camera-angle.png", "error": None,
                              "seconds": {"submit": 0.12, "queue_wait": 0.5, "boot": 4.0, "execution": 2.0,
                                          "publish": 0.05, "download": 0.04}}
    assert doc["jobs"][1]["seconds"]["execution"] is None and doc["jobs"][1]["file"] is None
    assert doc["taken_down"] is False and doc["local_mode"] is None


def test_no_boot_is_reported_when_the_box_was_already_up() -> None:
    """A demo run on a local mode whose box was up reports no boot time for this run."""
    from pathlib import Path

    from gpuctl.services.demo import DemoResult
    from gpuctl.services.local import BoxView

    box = BoxView("up", "i-1", "running", 10.0, 2.0, "", None, False, 300.0, boot_seconds=4.0)
    assert DemoResult(Path("/o"), box_before="up", box=box).document()["gpu_box"]["boot_seconds"] is None
