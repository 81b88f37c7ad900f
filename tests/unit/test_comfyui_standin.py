"""Pure parts of the ComfyUI stand-in: camera instructions, image transforms, validation, fault settings."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from PIL import Image, ImageChops, ImageDraw

from gpuctl.local import standin_images as images
from gpuctl.local.comfyui_standin import StandinFaults, _parser, config_from_args
from gpuctl.local.standin_nodes import DEFAULT_MODELS, Catalog, execution_order, validate_prompt
from gpuctl.local.standin_unified import CAMERA_ANGLE_GRAPH, build_graph, normalise_request
from gpuctl.models import build_camera_prompt


def _picture() -> Image.Image:
    img = Image.new("RGB", (80, 60), (200, 90, 40))
    ImageDraw.Draw(img).ellipse((10, 10, 70, 50), fill=(30, 160, 220))
    return img


@pytest.mark.parametrize(
    ("vertical", "horizontal", "zoom"),
    [(2, 0, 0), (-2, 0, 0), (1, 0, 0), (-1, 0, 0), (0, -2, 0), (0, -1, 0), (0, 1, 0), (0, 2, 0), (0, 0, 1), (0, 0, -1)],
)
def test_camera_prompts_from_gpuctl_round_trip(vertical: int, horizontal: int, zoom: int) -> None:
    """Every instruction gpuctl builds from the knobs is understood as the same camera move."""
    move = images.parse_camera_move(build_camera_prompt(vertical, horizontal, zoom))

    assert move == images.CameraMove(vertical=vertical, horizontal=horizontal, zoom=zoom)


def test_non_camera_prompt_is_not_a_move() -> None:
    """An edit instruction is not read as a camera move."""
    assert images.parse_camera_move("提取黑白线稿") is None
    assert images.parse_camera_move("black and white sketch") is None


def test_transforms_change_the_picture_and_keep_its_size() -> None:
    """Warp, still-camera warp and sketch all produce a different image of the same size."""
    src = _picture()

    for out in (
        images.camera_warp(src, images.CameraMove(vertical=2)),
        images.camera_warp(src, images.CameraMove()),
        images.sketch(src),
        images.stamp_label(src),
    ):
        assert out.size == src.size
        assert ImageChops.difference(src, out.convert("RGB")).getbbox() is not None


def test_scale_to_megapixels_rounds_to_steps() -> None:
    """ImageScaleToTotalPixels lands near the pixel budget with sides on the step grid."""
    out = images.scale_to_megapixels(_picture(), 0.25, 8, "lanczos")

    assert out.width % 8 == 0 and out.height % 8 == 0
    assert abs(out.width * out.height - 0.25 * 1024 * 1024) < 0.05 * 1024 * 1024


def test_validation_casts_literals_and_plans_reachable_nodes(tmp_path: Path) -> None:
    """A valid graph has its literals cast; only nodes upstream of outputs are planned."""
    (tmp_path / "in.png").write_bytes(b"x")
    graph = copy.deepcopy(CAMERA_ANGLE_GRAPH)
    graph["31"]["inputs"]["image"] = "in.png"
    graph["14"]["inputs"]["cfg"] = "1.5"
    graph["99"] = {"class_type": "EmptyLatentImage", "inputs": {"width": "x"}}  # unreachable: not validated

    result = validate_prompt(graph, Catalog(DEFAULT_MODELS, tmp_path, (0, 26, 0)))

    assert result.ok, result
    assert graph["14"]["inputs"]["cfg"] == 1.5
    order = execution_order(graph, result.good_outputs)
    assert "99" not in order
    assert order[-1] == "80"
    assert order.index("14") < order.index("12")


def test_dependency_cycle_is_reported(tmp_path: Path) -> None:
    """A cycle is a dependency_cycle error rather than endless recursion."""
    graph = {
        "1": {"class_type": "CFGNorm", "inputs": {"model": ["2", 0], "strength": 1}},
        "2": {"class_type": "CFGNorm", "inputs": {"model": ["1", 0], "strength": 1}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "x"}},
        "4": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["6", 0]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "VAELoader", "inputs": {"vae_name": "qwen_image_vae.safetensors"}},
        "7": {"class_type": "KSampler", "inputs": {"model": ["1", 0]}},
    }
    graph["4"]["inputs"]["samples"] = ["7", 0]

    result = validate_prompt(graph, Catalog(DEFAULT_MODELS, tmp_path, (0, 26, 0)))

    assert not result.ok
    kinds = {e["type"] for entry in result.node_errors.values() for e in entry["errors"]}
    assert "dependency_cycle" in kinds


def test_faults_update_checks_names_and_values() -> None:
    """Fault updates accept known names with sane values and reject the rest atomically."""
    faults = StandinFaults()

    faults.update({"fail_http_500": 2, "history_delay_s": 1, "execution_error": True})

    assert (faults.fail_http_500, faults.history_delay_s, faults.execution_error) == (2, 1.0, 1)
    with pytest.raises(ValueError, match="unknown fault"):
        faults.update({"restart": 1, "nope": 1})
    with pytest.raises(ValueError, match="bad value"):
        faults.update({"slow_first_job_s": "soon"})
    assert faults.restart == 0


def test_cli_flags_build_the_config() -> None:
    """CLI flags map onto StandinConfig and its faults."""
    args = _parser().parse_args(
        ["--port", "0", "--seconds-per-job", "0.5", "--fail-http-500", "1", "--restart", "2", "--stale-ws-cleanup"]
    )

    config = config_from_args(args)

    assert (config.port, config.seconds_per_job) == (0, 0.5)
    assert (config.faults.fail_http_500, config.faults.restart, config.faults.stale_ws_cleanup) == (1, 2, True)


def test_unified_request_defaults_and_graph() -> None:
    """Unified requests get SPEC §3 defaults and build the camera graph with the knob prompt."""
    req = normalise_request("camera-angle", {"image_url": "s3://b/k.png", "horizontal": -1, "seed": 3})

    graph = build_graph("camera-angle", req, ["unified/a_1.png"], "unified/a")

    assert req["steps"] == 8
    assert graph["11"]["inputs"]["prompt"] == build_camera_prompt(0, -1, 0)
    assert graph["14"]["inputs"]["seed"] == 3
    assert graph["31"]["inputs"]["image"] == "unified/a_1.png"
    assert graph["80"]["inputs"]["filename_prefix"] == "unified/a"


def test_command_line_takes_every_folder_and_the_cdn_domain(tmp_path: Path) -> None:
    """--temp-dir and --cdn-domain reach the config (local mode passes all three folders and the bucket)."""
    args = _parser().parse_args(["--input-dir", str(tmp_path / "i"), "--output-dir", str(tmp_path / "o"),
                                 "--temp-dir", str(tmp_path / "t"), "--output-bucket", "b",
                                 "--cdn-domain", "cdn.example.net"])
    config = config_from_args(args)
    assert (config.input_dir, config.output_dir, config.temp_dir) == (tmp_path / "i", tmp_path / "o", tmp_path / "t")
    assert (config.output_bucket, config.cdn_domain) == ("b", "cdn.example.net")
