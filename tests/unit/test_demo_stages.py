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
