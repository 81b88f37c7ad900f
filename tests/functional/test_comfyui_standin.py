"""The ComfyUI stand-in against ComfyUI's protocol (reference/comfyui-protocol.md), over real HTTP and WebSocket."""

from __future__ import annotations

import asyncio
import copy
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
from PIL import Image, ImageChops, ImageDraw

from gpuctl.local.comfyui_standin import StandinConfig, StandinFaults, StandinServer, main
from gpuctl.local.standin_nodes import NODES
from gpuctl.local.standin_unified import CAMERA_ANGLE_GRAPH, QWEN_IMAGE_EDIT_GRAPH

pytestmark = pytest.mark.server

WS_TIMEOUT = 20.0


# --- helpers ------------------------------------------------------------------------------------------------


def picture(size: tuple[int, int] = (96, 64), hue: int = 0) -> bytes:
    """A small colourful PNG with shapes, so sketches and warps visibly change it."""
    img = Image.new("RGB", size, ((200 + hue) % 256, 90, 40))
    draw = ImageDraw.Draw(img)
    w, h = size
    draw.ellipse((w // 5, h // 6, w * 4 // 5, h * 5 // 6), fill=(30, 160, (220 + hue) % 256))
    draw.rectangle((2, 2, w // 3, h // 3), fill=(250, 240, 0))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def camera_graph(image: str, *, prompt: str = "将镜头转为俯视", small: bool = True) -> dict[str, Any]:
    graph = copy.deepcopy(CAMERA_ANGLE_GRAPH)
    graph["31"]["inputs"]["image"] = image
    graph["11"]["inputs"]["prompt"] = prompt
    if small:
        graph["39"]["inputs"]["megapixels"] = 0.05
    return graph


def qwen_graph(images: list[str], *, small: bool = True) -> dict[str, Any]:
    graph = copy.deepcopy(QWEN_IMAGE_EDIT_GRAPH)
    for node_id, name in zip(("10", "8", "11"), images, strict=False):
        graph[node_id]["inputs"]["image"] = name
    if small:
        graph["15"]["inputs"]["megapixels"] = 0.05
    return graph


class Comfy:
    """A thin sync client for the stand-in plus a WebSocket recorder."""

    def __init__(self, server: StandinServer) -> None:
        self.server = server
        self.url = server.base_url
        self.http = httpx.Client(base_url=self.url, timeout=10.0)

    def upload(self, name: str, data: bytes, **fields: str) -> dict[str, Any]:
        r = self.http.post("/upload/image", files={"image": (name, data, "image/png")}, data=fields)
        r.raise_for_status()
        return dict(r.json())

    def post_prompt(self, graph: dict[str, Any], **extra: Any) -> httpx.Response:
        return self.http.post("/prompt", json={"prompt": graph, **extra})

    def queue(self, graph: dict[str, Any], **extra: Any) -> str:
        r = self.post_prompt(graph, **extra)
        assert r.status_code == 200, r.text
        return str(r.json()["prompt_id"])

    def history(self, prompt_id: str) -> dict[str, Any]:
        return dict(self.http.get(f"/history/{prompt_id}").json())

    def wait_history(self, prompt_id: str, timeout: float = WS_TIMEOUT) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.history(prompt_id)
            if entry:
                return dict(entry[prompt_id])
            time.sleep(0.05)
        raise AssertionError(f"prompt {prompt_id} never reached history")

    def wait_running(self, prompt_id: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            running = self.http.get("/queue").json()["queue_running"]
            if running and running[0][1] == prompt_id:
                return
            time.sleep(0.02)
        raise AssertionError(f"prompt {prompt_id} never started")

    def run_with_ws(
        self,
        submit: Callable[[], str],
        *,
        client_id: str = "tester",
        until: Callable[[dict[str, Any], str], bool] | None = None,
        on_message: Callable[[dict[str, Any], str], None] | None = None,
    ) -> tuple[str, list[dict[str, Any]]]:
        """Open /ws, call ``submit`` (returns a prompt id), record messages until the prompt's end."""

        def default_until(msg: dict[str, Any], pid: str) -> bool:
            data = msg["data"]
            return msg["type"] == "executing" and data.get("node") is None and data.get("prompt_id") == pid

        stop = until or default_until

        async def session() -> tuple[str, list[dict[str, Any]]]:
            messages: list[dict[str, Any]] = []
            async with (
                aiohttp.ClientSession() as http,
                http.ws_connect(f"{self.url}/ws?clientId={client_id}") as ws,
            ):
                messages.append(await ws.receive_json(timeout=5))
                prompt_id = await asyncio.to_thread(submit)
                async with asyncio.timeout(WS_TIMEOUT):
                    async for raw in ws:
                        if raw.type != aiohttp.WSMsgType.TEXT:
                            break
                        msg = json.loads(raw.data)
                        messages.append(msg)
                        if on_message is not None:
                            await asyncio.to_thread(on_message, msg, prompt_id)
                        if stop(msg, prompt_id):
                            break
            return prompt_id, messages

        return asyncio.run(session())

    def close(self) -> None:
        self.http.close()


@pytest.fixture
def make_standin() -> Iterator[Callable[..., Comfy]]:
    """Factory for running stand-ins (stopped after the test)."""
    started: list[tuple[StandinServer, Comfy]] = []

    def make(**kwargs: Any) -> Comfy:
        kwargs.setdefault("seconds_per_job", 0.2)
        # Most of this file checks the v0.26 protocol (reference §0-§9); the 0.3.x default has its own tests.
        kwargs.setdefault("comfyui_version", "0.26.0")
        server = StandinServer(StandinConfig(port=0, **kwargs))
        server.start()
        comfy = Comfy(server)
        started.append((server, comfy))
        return comfy

    yield make
    for server, comfy in started:
        comfy.close()
        server.stop()


@pytest.fixture
def comfy(make_standin: Callable[..., Comfy]) -> Comfy:
    """A stand-in with fast jobs and one input image ``adapter/in.png``."""
    c = make_standin()
    c.upload("in.png", picture(), subfolder="adapter")
    return c


def types_of(messages: list[dict[str, Any]]) -> list[str]:
    return [m["type"] for m in messages if m["type"] != "progress_state"]


# --- POST /prompt validation (§2, §3) ----------------------------------------------------------------------


def test_unknown_class_type_is_missing_node_type(comfy: Comfy) -> None:
    """An unregistered class answers 400 missing_node_type with empty node_errors."""
    graph = camera_graph("adapter/in.png")
    graph["5"] = {"class_type": "NotANode", "inputs": {}, "_meta": {"title": "My Node"}}

    r = comfy.post_prompt(graph)

    assert r.status_code == 400
    assert r.json() == {
        "error": {
            "type": "missing_node_type",
            "message": "Node 'My Node' not found. The custom node may not be installed.",
            "details": "Node ID '#5'",
            "extra_info": {"node_id": "5", "class_type": "NotANode", "node_title": "My Node"},
        },
        "node_errors": {},
    }


def test_node_without_class_type(comfy: Comfy) -> None:
    """A node lacking class_type is reported with class_type null."""
    r = comfy.post_prompt({"7": {"inputs": {}}})

    assert r.status_code == 400
    error = r.json()["error"]
    assert error["type"] == "missing_node_type"
    assert error["message"] == (
        "Node 'ID #7' has no class_type. The workflow may be corrupted or a custom node is missing."
    )
    assert error["extra_info"] == {"node_id": "7", "class_type": None, "node_title": None}


def test_legacy_version_reports_invalid_prompt(make_standin: Callable[..., Comfy]) -> None:
    """Before v0.12 an unknown class was an invalid_prompt error."""
    comfy = make_standin(comfyui_version="0.3.64")

    r = comfy.post_prompt({"1": {"class_type": "Nope", "inputs": {}}})

    assert r.json()["error"] == {
        "type": "invalid_prompt",
        "message": "Cannot execute because node Nope does not exist.",
        "details": "Node ID '#1'",
        "extra_info": {},
    }


def test_no_output_node(comfy: Comfy) -> None:
    """A graph without SaveImage is prompt_no_outputs."""
    graph = camera_graph("adapter/in.png")
    del graph["80"]

    r = comfy.post_prompt(graph)

    assert r.status_code == 400
    assert r.json() == {
        "error": {"type": "prompt_no_outputs", "message": "Prompt has no outputs", "details": "", "extra_info": {}},
        "node_errors": {},
    }


def test_no_prompt_key(comfy: Comfy) -> None:
    """A body without "prompt" is no_prompt."""
    r = comfy.http.post("/prompt", json={"client_id": "x"})

    assert r.status_code == 400
    assert r.json()["error"] == {
        "type": "no_prompt",
        "message": "No prompt provided",
        "details": "No prompt provided",
        "extra_info": {},
    }


def test_reference_export_lacks_resolution_steps(comfy: Comfy) -> None:
    """The seed's export misses ImageScaleToTotalPixels.resolution_steps, required since v0.6.0."""
    # GIVEN the camera-angle graph exactly as exported (no resolution_steps) and a real input file
    graph = camera_graph("adapter/in.png", small=False)
    del graph["39"]["inputs"]["resolution_steps"]

    # WHEN it is posted to a v0.26 server
    r = comfy.post_prompt(graph)

    # THEN the upstream node carries the reason, and details is empty because the output node itself is fine
    assert r.status_code == 400
    body = r.json()
    assert body["error"] == {
        "type": "prompt_outputs_failed_validation",
        "message": "Prompt outputs failed validation",
        "details": "",
        "extra_info": {},
    }
    assert body["node_errors"] == {
        "39": {
            "errors": [
                {
                    "type": "required_input_missing",
                    "message": "Required input is missing",
                    "details": "resolution_steps",
                    "extra_info": {"input_name": "resolution_steps"},
                }
            ],
            "dependent_outputs": ["80"],
            "class_type": "ImageScaleToTotalPixels",
        }
    }


def test_resolution_steps_optional_before_v0_6(make_standin: Callable[..., Comfy]) -> None:
    """On a v0.5 server the seed's export validates as it is."""
    comfy = make_standin(comfyui_version="0.5.1")
    comfy.upload("in.png", picture(), subfolder="adapter")
    graph = camera_graph("adapter/in.png")
    del graph["39"]["inputs"]["resolution_steps"]

    r = comfy.post_prompt(graph)

    assert r.status_code == 200, r.text


def test_output_node_error_is_in_details(comfy: Comfy) -> None:
    """A missing input on the output node itself is spelled out in error.details."""
    graph = camera_graph("adapter/in.png")
    del graph["80"]["inputs"]["images"]

    body = comfy.post_prompt(graph).json()

    assert body["error"]["details"] == "Required input is missing: images"
    assert list(body["node_errors"]) == ["80"]


def test_link_errors(comfy: Comfy) -> None:
    """Bad link shapes, dangling links and type mismatches use ComfyUI's error types."""
    # GIVEN three broken graphs
    bad_shape = camera_graph("adapter/in.png")
    bad_shape["12"]["inputs"]["samples"] = ["14", 0, 1]
    dangling_on_output = camera_graph("adapter/in.png")
    dangling_on_output["80"]["inputs"]["images"] = ["99", 0]
    dangling_inner = camera_graph("adapter/in.png")
    dangling_inner["12"]["inputs"]["samples"] = ["99", 0]
    mismatch = camera_graph("adapter/in.png")
    mismatch["12"]["inputs"]["samples"] = ["39", 0]

    # WHEN each is posted
    shape_err = comfy.post_prompt(bad_shape).json()["node_errors"]["12"]["errors"][0]
    out_err = comfy.post_prompt(dangling_on_output).json()["node_errors"]["80"]["errors"][0]
    inner = comfy.post_prompt(dangling_inner).json()
    mismatch_err = comfy.post_prompt(mismatch).json()["node_errors"]["12"]["errors"][0]

    # THEN
    assert shape_err["type"] == "bad_linked_input"
    assert shape_err["message"] == "Bad linked input, must be a length-2 list of [node_id, slot_index]"
    assert shape_err["extra_info"]["received_value"] == ["14", 0, 1]
    assert out_err["type"] == "exception_during_validation"
    assert out_err["details"] == "'99'"
    assert out_err["extra_info"]["exception_type"] == "KeyError"
    assert inner["node_errors"]["12"]["errors"][0]["type"] == "exception_during_inner_validation"
    assert inner["node_errors"]["12"]["errors"][0]["extra_info"]["linked_node"] == ["12", 0]
    assert mismatch_err["type"] == "return_type_mismatch"
    assert mismatch_err["details"] == "samples, received_type(IMAGE) mismatch input_type(LATENT)"


def test_value_errors(comfy: Comfy) -> None:
    """Model files, combos, ranges, conversions and missing inputs files fail per input."""
    graph = camera_graph("adapter/in.png")
    graph["77"]["inputs"]["unet_name"] = "missing.safetensors"
    graph["14"]["inputs"]["sampler_name"] = "warp_drive"
    graph["14"]["inputs"]["steps"] = 0
    graph["14"]["inputs"]["cfg"] = "lots"
    graph["31"]["inputs"]["image"] = "nope.png"

    errors = comfy.post_prompt(graph).json()["node_errors"]

    unet = errors["77"]["errors"][0]
    assert unet["type"] == "value_not_in_list"
    assert unet["details"].startswith("unet_name: 'missing.safetensors' not in [")
    assert unet["extra_info"]["input_config"] is not None
    by_input = {e["extra_info"]["input_name"]: e for e in errors["14"]["errors"]}
    assert by_input["sampler_name"]["details"] == f"sampler_name: 'warp_drive' not in (list of length {39})"
    assert by_input["sampler_name"]["extra_info"]["input_config"] is None
    assert by_input["steps"]["type"] == "value_smaller_than_min"
    assert by_input["steps"]["message"] == "Value 0 smaller than min of 1"
    assert by_input["cfg"]["type"] == "invalid_input_type"
    assert by_input["cfg"]["message"] == "Failed to convert an input value to a FLOAT value"
    assert errors["31"]["errors"] == [
        {
            "type": "custom_validation_failed",
            "message": "Custom validation failed for node",
            "details": "image - Invalid image file: nope.png",
            "extra_info": {"input_name": "image"},
        }
    ]


def test_prompt_id_must_be_canonical_uuid(comfy: Comfy) -> None:
    """v0.25+: a client prompt_id must be a canonical lowercase UUID; a good one is echoed."""
    good = str(uuid.uuid4())

    upper = comfy.post_prompt(camera_graph("adapter/in.png"), prompt_id=good.upper())
    junk = comfy.post_prompt(camera_graph("adapter/in.png"), prompt_id="job-1")
    ok = comfy.post_prompt(camera_graph("adapter/in.png"), prompt_id=good)

    for bad in (upper, junk):
        assert bad.status_code == 400
        assert bad.json()["error"]["type"] == "invalid_prompt_id"
        assert bad.json()["error"]["message"] == "prompt_id must be a valid UUID"
    assert ok.status_code == 200
    assert ok.json()["prompt_id"] == good
    assert ok.json()["node_errors"] == {}


def test_number_counts_every_post_and_front_jumps(comfy: Comfy) -> None:
    """The counter rises on every POST without number (valid or not); front negates it; number is echoed."""
    first = comfy.post_prompt({"1": {"class_type": "Nope"}})
    second = comfy.post_prompt(camera_graph("adapter/in.png"))
    front = comfy.post_prompt(camera_graph("adapter/in.png"), front=True)
    explicit = comfy.post_prompt(camera_graph("adapter/in.png"), number=5)

    assert first.status_code == 400
    assert second.json()["number"] == 1
    assert front.json()["number"] == -2
    assert explicit.json()["number"] == 5.0


def test_non_json_body_is_plain_500(comfy: Comfy) -> None:
    """Unparseable JSON ends in aiohttp's generic 500, as in ComfyUI."""
    r = comfy.http.post("/prompt", content=b"{not json", headers={"Content-Type": "application/json"})

    assert r.status_code == 500


# --- running the reference workflows (§4, §9) --------------------------------------------------------------


def test_camera_angle_run_events_and_history(make_standin: Callable[..., Comfy]) -> None:
    """A full camera-angle run sends the §9.6 sequence and leaves the §4.1 history entry."""
    # GIVEN a stand-in and the reference graph at full size
    comfy = make_standin(seconds_per_job=0.4)
    comfy.upload("in.png", picture(), subfolder="adapter")
    graph = camera_graph("adapter/in.png", small=False)
    pid = str(uuid.uuid4())

    # WHEN it is queued with our client_id and prompt_id
    _, messages = comfy.run_with_ws(lambda: comfy.queue(graph, client_id="tester", prompt_id=pid))

    # THEN the messages come in ComfyUI's order
    types = types_of(messages)
    assert types[:5] == ["status", "status", "status", "execution_start", "execution_cached"]
    assert messages[0]["data"]["sid"] == "tester"
    assert [m["data"]["status"]["exec_info"]["queue_remaining"] for m in messages[1:3]] == [1, 1]
    assert types[-4:] == ["executed", "execution_success", "status", "executing"]
    assert messages[-2]["data"]["status"]["exec_info"]["queue_remaining"] == 0
    assert messages[-1]["data"] == {"node": None, "prompt_id": pid}
    executing = [m["data"]["node"] for m in messages if m["type"] == "executing" and m["data"]["node"]]
    assert set(executing) == set(graph)
    assert executing.index("14") < executing.index("12") < executing.index("80")
    progress = [m["data"] for m in messages if m["type"] == "progress"]
    assert [p["value"] for p in progress] == list(range(1, 9))
    assert {(p["max"], p["node"], p["prompt_id"]) for p in progress} == {(8, "14", pid)}
    # progress events sit between "executing 14" and "executing 12"
    order = [(m["type"], m["data"].get("node")) for m in messages if m["type"] in ("executing", "progress")]
    assert order.index(("executing", "14")) < order.index(("progress", "14")) < order.index(("executing", "12"))
    assert all(m["data"]["prompt_id"] == pid for m in messages if m["type"] in ("executing", "executed"))
    # AND history is the source of truth
    entry = comfy.history(pid)[pid]
    assert entry["status"]["status_str"] == "success"
    assert entry["status"]["completed"] is True
    assert [m[0] for m in entry["status"]["messages"]] == ["execution_start", "execution_cached", "execution_success"]
    assert all(isinstance(m[1]["timestamp"], int) for m in entry["status"]["messages"])
    assert entry["outputs"] == {
        "80": {"images": [{"filename": "ComfyUI_00001_.png", "subfolder": "", "type": "output"}]}
    }
    assert entry["meta"] == {"80": {"node_id": "80", "display_node": "80", "parent_node": None, "real_node_id": "80"}}
    _, prompt_id, stored_graph, extra, outputs = entry["prompt"]
    assert (prompt_id, outputs, extra["client_id"]) == (pid, ["80"], "tester")
    assert isinstance(extra["create_time"], int)
    assert stored_graph["14"]["inputs"]["cfg"] == 1.0  # validation cast the INT literal to FLOAT
    # AND /view serves a PNG at ~1 MP that is not the input
    view = comfy.http.get("/view", params={"filename": "ComfyUI_00001_.png", "subfolder": "", "type": "output"})
    assert view.status_code == 200
    assert view.headers["content-type"] == "image/png"
    out = Image.open(io.BytesIO(view.content))
    assert out.format == "PNG"
    assert 0.9e6 < out.width * out.height < 1.2e6
    src = Image.open(io.BytesIO(picture())).convert("RGB").resize(out.size)
    assert ImageChops.difference(src, out.convert("RGB")).getbbox() is not None
    assert json.loads(out.info["prompt"])["31"]["inputs"]["image"] == "adapter/in.png"


def test_camera_warp_depends_on_the_prompt(comfy: Comfy) -> None:
    """Different camera instructions give different pictures."""
    top = comfy.queue(camera_graph("adapter/in.png", prompt="将镜头转为俯视"))
    left = comfy.queue(camera_graph("adapter/in.png", prompt="将镜头向左旋转90度"))

    images = []
    for pid in (top, left):
        item = comfy.wait_history(pid)["outputs"]["80"]["images"][0]
        images.append(Image.open(io.BytesIO(comfy.http.get("/view", params=item).content)).convert("RGB"))

    assert ImageChops.difference(images[0], images[1]).getbbox() is not None


def test_qwen_image_edit_run_makes_a_sketch(comfy: Comfy) -> None:
    """The qwen-image-edit graph with three images runs and returns a greyscale sketch of image 1."""
    # GIVEN three uploaded images
    names = []
    for i in range(3):
        up = comfy.upload(f"img{i}.png", picture(hue=40 * i), subfolder="adapter")
        names.append(f"{up['subfolder']}/{up['name']}")
    graph = qwen_graph(names)

    # WHEN the graph runs
    pid, messages = comfy.run_with_ws(lambda: comfy.queue(graph, client_id="tester"))

    # THEN the unreachable EmptyLatentImage (node 9) never runs and the output is grey
    executing = {m["data"]["node"] for m in messages if m["type"] == "executing"}
    assert "9" not in executing
    assert {"1", "2", "3", "4", "5", "8", "10", "11", "13", "15", "16"} <= executing
    assert [m["data"]["value"] for m in messages if m["type"] == "progress"] == [1, 2, 3, 4]
    item = comfy.wait_history(pid)["outputs"]["13"]["images"][0]
    out = Image.open(io.BytesIO(comfy.http.get("/view", params=item).content)).convert("RGB")
    r, g, b = out.split()
    assert ImageChops.difference(r, g).getbbox() is None
    assert ImageChops.difference(r, b).getbbox() is None


def test_identical_prompt_is_served_from_cache(comfy: Comfy) -> None:
    """Re-posting the same graph runs nothing and points at the earlier file (§10.1)."""
    graph = camera_graph("adapter/in.png")
    first = comfy.wait_history(comfy.queue(graph))

    pid, messages = comfy.run_with_ws(lambda: comfy.queue(graph, client_id="tester"))
    second = comfy.history(pid)[pid]

    cached = next(m for m in messages if m["type"] == "execution_cached")["data"]["nodes"]
    assert set(cached) == set(graph)
    assert not [m for m in messages if m["type"] == "executing" and m["data"]["node"]]
    assert second["outputs"] == first["outputs"]
    assert sorted(p.name for p in comfy.server.output_dir.iterdir()) == ["ComfyUI_00001_.png"]


def test_changed_seed_reruns_and_numbers_files(comfy: Comfy) -> None:
    """A new seed re-runs the sampler onward and SaveImage takes the next counter."""
    graph = camera_graph("adapter/in.png")
    comfy.wait_history(comfy.queue(graph))
    graph["14"]["inputs"]["seed"] = 1

    pid, messages = comfy.run_with_ws(lambda: comfy.queue(graph, client_id="tester"))

    ran = [m["data"]["node"] for m in messages if m["type"] == "executing" and m["data"]["node"]]
    assert ran == ["14", "12", "80"]
    assert comfy.history(pid)[pid]["outputs"]["80"]["images"][0]["filename"] == "ComfyUI_00002_.png"


def test_prefix_with_subfolder(comfy: Comfy) -> None:
    """filename_prefix "adapter/job1" saves job1_00001_.png in subfolder adapter."""
    graph = camera_graph("adapter/in.png")
    graph["80"]["inputs"]["filename_prefix"] = "adapter/job1"

    entry = comfy.wait_history(comfy.queue(graph))

    assert entry["outputs"]["80"]["images"] == [
        {"filename": "job1_00001_.png", "subfolder": "adapter", "type": "output"}
    ]


def test_without_client_id_only_broadcasts_arrive(comfy: Comfy) -> None:
    """A prompt without client_id sends only status and progress to the sockets (§9.4)."""

    def done(msg: dict[str, Any], pid: str) -> bool:
        return bool(msg["type"] == "status" and msg["data"]["status"]["exec_info"]["queue_remaining"] == 0)

    pid, messages = comfy.run_with_ws(lambda: comfy.queue(camera_graph("adapter/in.png")), until=done)

    assert set(types_of(messages)) == {"status", "progress"}
    assert comfy.wait_history(pid)["status"]["status_str"] == "success"


def test_messages_for_other_clients_are_not_delivered(comfy: Comfy) -> None:
    """Targeted messages go only to the socket whose clientId matches the prompt's client_id."""

    def done(msg: dict[str, Any], pid: str) -> bool:
        return bool(msg["type"] == "status" and msg["data"]["status"]["exec_info"]["queue_remaining"] == 0)

    _, messages = comfy.run_with_ws(
        lambda: comfy.queue(camera_graph("adapter/in.png"), client_id="someone-else"), until=done
    )

    assert "execution_start" not in types_of(messages)
    assert "progress" not in types_of(messages)


def test_feature_flags_handshake(comfy: Comfy) -> None:
    """A first feature_flags message gets the server flags back."""

    async def talk() -> dict[str, Any]:
        async with aiohttp.ClientSession() as http, http.ws_connect(f"{comfy.url}/api/ws?clientId=ff") as ws:
            await ws.receive_json(timeout=5)
            await ws.send_json({"type": "feature_flags", "data": {"supports_preview_metadata": True}})
            return dict(await ws.receive_json(timeout=5))

    reply = asyncio.run(talk())

    assert reply["type"] == "feature_flags"
    assert reply["data"]["supports_preview_metadata"] is True


def test_runtime_error_when_input_disappears(comfy: Comfy) -> None:
    """A real exception in a node ends as execution_error with the §4.2 fields."""
    # GIVEN a queued job behind a slow one, whose input file is deleted before it runs
    comfy.upload("gone.png", picture(hue=99))
    comfy.server.set_faults(slow_first_job_s=1.0)
    blocker = comfy.queue(camera_graph("adapter/in.png"))
    victim = comfy.queue(camera_graph("gone.png"))
    (comfy.server.input_dir / "gone.png").unlink()

    # WHEN both finish
    comfy.wait_history(blocker)
    entry = comfy.wait_history(victim)

    # THEN the victim failed at LoadImage with a FileNotFoundError
    assert entry["status"]["status_str"] == "error"
    assert entry["status"]["completed"] is False
    event, data = entry["status"]["messages"][-1]
    assert event == "execution_error"
    assert (data["node_id"], data["node_type"], data["exception_type"]) == ("31", "LoadImage", "FileNotFoundError")
    assert data["exception_message"].endswith("\n")
    assert isinstance(data["traceback"], list)
    assert data["current_inputs"]["image"] == ["gone.png"]
    assert entry["outputs"] == {}


# --- /view, /upload/image (§5, §6) ------------------------------------------------------------------------


def test_view_status_codes(comfy: Comfy) -> None:
    """/view answers 404/400/403 as ComfyUI does and re-encodes on request."""
    assert comfy.http.get("/view").status_code == 404
    assert comfy.http.get("/view", params={"filename": "../x.png"}).status_code == 400
    assert comfy.http.get("/view", params={"filename": "/etc/passwd"}).status_code == 400
    assert comfy.http.get("/view", params={"filename": "in.png", "type": "bogus"}).status_code == 400
    escape = {"filename": "in.png", "type": "input", "subfolder": "../../"}
    assert comfy.http.get("/view", params=escape).status_code == 403
    assert comfy.http.get("/view", params={"filename": "none.png"}).status_code == 404
    raw = comfy.http.get("/view", params={"filename": "in.png", "subfolder": "adapter", "type": "input"})
    assert raw.status_code == 200
    assert raw.content == picture()
    assert raw.headers["content-disposition"] == 'filename="in.png"'
    annotated = comfy.http.get("/view", params={"filename": "in.png [input]", "subfolder": "adapter"})
    assert annotated.content == picture()
    jpeg = comfy.http.get("/view", params={"filename": "in.png [input]", "subfolder": "adapter", "preview": "jpeg;80"})
    assert jpeg.headers["content-type"] == "image/jpeg"
    alpha = comfy.http.get("/api/view", params={"filename": "in.png [input]", "subfolder": "adapter", "channel": "a"})
    assert Image.open(io.BytesIO(alpha.content)).mode == "L"


def test_upload_reuse_rename_overwrite(comfy: Comfy) -> None:
    """Same content reuses the name, different content is renamed " (1)", overwrite replaces."""
    same = comfy.upload("in.png", picture(), subfolder="adapter")
    other = comfy.upload("in.png", picture(hue=50), subfolder="adapter")
    forced = comfy.upload("in.png", picture(hue=80), subfolder="adapter", overwrite="true")

    assert same == {"name": "in.png", "subfolder": "adapter", "type": "input"}
    assert other["name"] == "in (1).png"
    assert forced["name"] == "in.png"
    assert (comfy.server.input_dir / "adapter" / "in.png").read_bytes() == picture(hue=80)
    assert (comfy.server.input_dir / "adapter" / "in (1).png").read_bytes() == picture(hue=50)


def test_upload_errors(comfy: Comfy) -> None:
    """No image part -> 400; a subfolder that escapes -> 400; upload to output type works."""
    assert comfy.http.post("/upload/image", data={"subfolder": "x"}, files={"other": ("a", b"b")}).status_code == 400
    escape = comfy.http.post("/upload/image", files={"image": ("a.png", picture())}, data={"subfolder": "../.."})
    assert escape.status_code == 400
    out = comfy.http.post("/upload/image", files={"image": ("o.png", picture())}, data={"type": "output"})
    assert out.json() == {"name": "o.png", "subfolder": "", "type": "output"}
    assert comfy.http.get("/view", params={"filename": "o.png"}).content == picture()


# --- queue, interrupt, history (§4.3, §7) --------------------------------------------------------------------


def test_queue_listing_delete_and_clear(make_standin: Callable[..., Comfy]) -> None:
    """/queue shows the running and pending items; POST /queue deletes and clears pending ones only."""
    comfy = make_standin(seconds_per_job=3.0)
    comfy.upload("in.png", picture(), subfolder="adapter")
    running = comfy.queue(camera_graph("adapter/in.png"))
    p1 = comfy.queue(camera_graph("adapter/in.png", prompt="a"))
    p2 = comfy.queue(camera_graph("adapter/in.png", prompt="b"))
    p3 = comfy.queue(camera_graph("adapter/in.png", prompt="c"))
    comfy.wait_running(running)

    q = comfy.http.get("/queue").json()
    assert [item[1] for item in q["queue_running"]] == [running]
    assert sorted(item[1] for item in q["queue_pending"]) == sorted([p1, p2, p3])
    assert len(q["queue_running"][0]) == 5
    assert comfy.http.get("/prompt").json() == {"exec_info": {"queue_remaining": 4}}

    assert comfy.http.post("/queue", json={"delete": [p1, running]}).status_code == 200
    assert sorted(i[1] for i in comfy.http.get("/queue").json()["queue_pending"]) == sorted([p2, p3])
    comfy.http.post("/queue", json={"clear": True})
    q = comfy.http.get("/queue").json()
    assert q["queue_pending"] == []
    assert [item[1] for item in q["queue_running"]] == [running]
    comfy.http.post("/interrupt")


def test_interrupt_by_prompt_id(make_standin: Callable[..., Comfy]) -> None:
    """Interrupting the running prompt by id ends it as execution_interrupted; other ids are ignored."""
    # GIVEN a slow job that is sampling
    comfy = make_standin(seconds_per_job=8.0)
    comfy.upload("in.png", picture(), subfolder="adapter")

    def on_message(msg: dict[str, Any], pid: str) -> None:
        if msg["type"] == "progress" and msg["data"]["value"] == 1:
            # WHEN an interrupt names another prompt, then ours
            comfy.http.post("/interrupt", json={"prompt_id": str(uuid.uuid4())})
            comfy.http.post("/interrupt", json={"prompt_id": pid})

    started = time.monotonic()
    pid, messages = comfy.run_with_ws(
        lambda: comfy.queue(camera_graph("adapter/in.png"), client_id="tester"), on_message=on_message
    )

    # THEN it stops promptly, and history shows the interrupt
    assert time.monotonic() - started < 6
    types = types_of(messages)
    assert types[-3:] == ["execution_interrupted", "status", "executing"]
    interrupted = next(m for m in messages if m["type"] == "execution_interrupted")["data"]
    assert (interrupted["node_id"], interrupted["node_type"]) == ("14", "KSampler")
    assert "77" in interrupted["executed"]
    entry = comfy.history(pid)[pid]
    assert entry["status"]["status_str"] == "error"
    assert entry["status"]["completed"] is False
    assert entry["status"]["messages"][-1][0] == "execution_interrupted"
    assert set(entry["status"]["messages"][-1][1]) == {"prompt_id", "node_id", "node_type", "executed", "timestamp"}
    assert comfy.http.get(f"/api/jobs/{pid}").json()["status"] == "cancelled"


def test_global_interrupt_and_jobs_cancel(make_standin: Callable[..., Comfy]) -> None:
    """POST /interrupt without a body stops whatever runs; /api/jobs/{id}/cancel dequeues a pending one."""
    comfy = make_standin(seconds_per_job=30.0)
    comfy.upload("in.png", picture(), subfolder="adapter")
    running = comfy.queue(camera_graph("adapter/in.png"))
    pending = comfy.queue(camera_graph("adapter/in.png", prompt="x"))
    comfy.wait_running(running)

    assert comfy.http.get(f"/api/jobs/{running}").json()["status"] == "in_progress"
    assert comfy.http.get(f"/api/jobs/{pending}").json()["status"] == "pending"
    assert comfy.http.post(f"/api/jobs/{pending}/cancel").json() == {"cancelled": True}
    comfy.http.post("/interrupt", content=b"")
    entry = comfy.wait_history(running, timeout=10)

    assert entry["status"]["messages"][-1][0] == "execution_interrupted"
    assert comfy.http.get(f"/api/jobs/{pending}").status_code == 404
    assert comfy.http.post(f"/api/jobs/{pending}/cancel").json() == {"cancelled": False}


def test_history_listing_and_delete(comfy: Comfy) -> None:
    """GET /history lists oldest first with max_items/offset; POST /history deletes and clears."""
    ids = [comfy.queue(camera_graph("adapter/in.png", prompt=f"p{i}")) for i in range(3)]
    for pid in ids:
        comfy.wait_history(pid)

    assert list(comfy.http.get("/history").json()) == ids
    assert list(comfy.http.get("/history", params={"max_items": 2}).json()) == ids[1:]
    assert list(comfy.http.get("/api/history", params={"max_items": 1, "offset": 0}).json()) == ids[:1]
    assert comfy.http.get(f"/history/{uuid.uuid4()}").json() == {}
    comfy.http.post("/history", json={"delete": [ids[0]]})
    assert list(comfy.http.get("/history").json()) == ids[1:]
    comfy.http.post("/history", json={"clear": True})
    assert comfy.http.get("/history").json() == {}


# --- info endpoints (§8) ------------------------------------------------------------------------------------


def test_object_info_lists_exactly_the_supported_nodes(comfy: Comfy) -> None:
    """/object_info lists the reference workflows' classes with ComfyUI's input names; unknown -> {}."""
    info = comfy.http.get("/object_info").json()
    used = {n["class_type"] for n in (*CAMERA_ANGLE_GRAPH.values(), *QWEN_IMAGE_EDIT_GRAPH.values())}

    assert set(info) == set(NODES)
    assert used <= set(info)
    unet = comfy.http.get("/api/object_info/UNETLoader").json()["UNETLoader"]
    assert unet["input"]["required"]["unet_name"][0] == [
        "Qwen-Image-Edit-2509_fp8_e4m3fn.safetensors",
        "qwen_image_edit_2509_fp8_e4m3fn.safetensors",
    ]
    qwen = info["TextEncodeQwenImageEditPlus"]
    assert qwen["input_order"] == {"required": ["clip", "prompt"], "optional": ["vae", "image1", "image2", "image3"]}
    assert info["SaveImage"]["output_node"] is True
    assert "adapter/in.png" in info["LoadImage"]["input"]["required"]["image"][0]
    assert comfy.http.get("/object_info/TextEncodeQwenImageEdit").json() == {}


def test_system_stats_models_and_root(comfy: Comfy) -> None:
    """/system_stats reports the configured version; /models lists folders; / answers HTML."""
    stats = comfy.http.get("/api/system_stats").json()

    assert stats["system"]["comfyui_version"] == "0.26.0"
    assert stats["devices"][0]["type"] == "cpu"
    assert "vae" in comfy.http.get("/models").json()
    assert comfy.http.get("/models/vae").json() == ["qwen_image_vae.safetensors"]
    assert comfy.http.get("/models/nope").status_code == 404
    assert comfy.http.get("/").status_code == 200


def test_origin_mismatch_is_forbidden(comfy: Comfy) -> None:
    """Host loopback + a different Origin -> 403, as ComfyUI's middleware does."""
    r = comfy.http.get("/system_stats", headers={"Origin": "http://evil.example"})

    assert r.status_code == 403


# --- fault switches ------------------------------------------------------------------------------------------


def test_fail_http_500_via_admin_route(comfy: Comfy) -> None:
    """fail_http_500=2 makes the next two POST /prompt answer 500 and queue nothing."""
    r = comfy.http.post("/_standin/faults", json={"fail_http_500": 2})
    assert r.json()["fail_http_500"] == 2

    codes = [comfy.post_prompt(camera_graph("adapter/in.png")).status_code for _ in range(3)]

    assert codes == [500, 500, 200]
    assert comfy.http.get("/_standin/faults").json()["fail_http_500"] == 0


def test_fault_route_rejects_unknown_names(comfy: Comfy) -> None:
    """Unknown fault names or bad values are a 400 and change nothing."""
    bad_name = comfy.http.post("/_standin/faults", json={"explode": 1, "fail_http_500": 1})
    bad_value = comfy.http.post("/_standin/faults", json={"restart": -1})

    assert (bad_name.status_code, bad_value.status_code) == (400, 400)
    assert comfy.http.get("/_standin/faults").json() == StandinFaults().to_dict()


def test_execution_error_fault(comfy: Comfy) -> None:
    """execution_error fails the next job at the named node with the §4.2 payload, then jobs succeed again."""
    comfy.server.set_faults(execution_error=1, execution_error_node="KSampler", execution_error_message="CUDA oops")

    pid, messages = comfy.run_with_ws(lambda: comfy.queue(camera_graph("adapter/in.png"), client_id="tester"))
    after = comfy.wait_history(comfy.queue(camera_graph("adapter/in.png", prompt="again")))

    assert types_of(messages)[-3:] == ["execution_error", "status", "executing"]
    entry = comfy.history(pid)[pid]
    assert entry["status"]["status_str"] == "error"
    event, data = entry["status"]["messages"][-1]
    assert event == "execution_error"
    assert data["node_id"] == "14"
    assert data["node_type"] == "KSampler"
    assert data["exception_message"] == "CUDA oops\n"
    assert data["exception_type"] == "RuntimeError"
    assert set(data) >= {"executed", "traceback", "current_inputs", "current_outputs", "timestamp"}
    assert data["current_inputs"]["seed"] == [216113436124078]
    assert "12" not in data["executed"]
    assert after["status"]["status_str"] == "success"


def test_drop_websocket_fault(make_standin: Callable[..., Comfy]) -> None:
    """drop_websocket cuts the socket mid-job; the job still finishes and history tells the truth."""
    comfy = make_standin(seconds_per_job=1.0, faults=StandinFaults(drop_websocket=1))
    comfy.upload("in.png", picture(), subfolder="adapter")

    pid, messages = comfy.run_with_ws(lambda: comfy.queue(camera_graph("adapter/in.png"), client_id="tester"))

    types = types_of(messages)
    assert "execution_start" in types
    assert "execution_success" not in types
    assert comfy.wait_history(pid)["status"]["status_str"] == "success"


def test_reconnect_replays_executing(make_standin: Callable[..., Comfy]) -> None:
    """Reconnecting with the same clientId mid-run gets status and an executing replay without prompt_id."""
    comfy = make_standin(seconds_per_job=4.0)
    comfy.upload("in.png", picture(), subfolder="adapter")

    def until(msg: dict[str, Any], pid: str) -> bool:
        return bool(msg["type"] == "progress")

    comfy.run_with_ws(lambda: comfy.queue(camera_graph("adapter/in.png"), client_id="tester"), until=until)

    async def reconnect() -> list[dict[str, Any]]:
        async with aiohttp.ClientSession() as http, http.ws_connect(f"{comfy.url}/ws?clientId=tester") as ws:
            return [await ws.receive_json(timeout=5), await ws.receive_json(timeout=5)]

    first, second = asyncio.run(reconnect())
    comfy.http.post("/interrupt")

    assert first["type"] == "status"
    assert second == {"type": "executing", "data": {"node": "14"}}


def test_restart_fault_forgets_everything(make_standin: Callable[..., Comfy]) -> None:
    """restart mid-job: the prompt never reaches history, queue and counter reset, sockets drop."""
    # GIVEN a restart armed for the next job, and a second prompt waiting behind it
    comfy = make_standin(seconds_per_job=1.0)
    comfy.upload("in.png", picture(), subfolder="adapter")
    comfy.http.post("/_standin/faults", json={"restart": 1})
    waiting: list[str] = []

    def submit() -> str:
        pid = comfy.queue(camera_graph("adapter/in.png"), client_id="tester")
        waiting.append(comfy.queue(camera_graph("adapter/in.png", prompt="b")))
        return pid

    # WHEN the job runs
    pid, messages = comfy.run_with_ws(submit)

    # THEN the socket closed before any terminal event, and the server forgot both prompts
    assert not {"execution_success", "execution_error", "execution_interrupted"} & set(types_of(messages))
    deadline = time.monotonic() + 5
    while comfy.http.get("/queue").json()["queue_running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.5)  # longer than the job would have taken
    assert comfy.history(pid) == {}
    assert comfy.history(waiting[0]) == {}
    assert comfy.http.get("/queue").json() == {"queue_running": [], "queue_pending": []}
    assert comfy.http.get(f"/api/jobs/{pid}").status_code == 404
    assert comfy.post_prompt(camera_graph("adapter/in.png", prompt="c")).json()["number"] == 0


def test_restart_with_downtime_refuses_connections(make_standin: Callable[..., Comfy]) -> None:
    """A restart with downtime closes the port for that long, then serves again."""
    comfy = make_standin()
    threading_result: list[Exception] = []
    restart_thread = _start_thread(lambda: comfy.server.restart(downtime_s=1.0), threading_result)
    time.sleep(0.4)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{comfy.url}/system_stats", timeout=2)
    restart_thread.join(10)

    assert not threading_result
    assert httpx.get(f"{comfy.url}/system_stats", timeout=5).status_code == 200


def _start_thread(fn: Callable[[], None], errors: list[Exception]) -> threading.Thread:
    def run() -> None:
        try:
            fn()
        except Exception as exc:
            errors.append(exc)

    t = threading.Thread(target=run)
    t.start()
    return t


def test_slow_first_job(make_standin: Callable[..., Comfy]) -> None:
    """slow_first_job_s delays the first job only (model load), and again after unload_models."""
    comfy = make_standin(seconds_per_job=0.1, faults=StandinFaults(slow_first_job_s=1.0))
    comfy.upload("in.png", picture(), subfolder="adapter")

    def timed(prompt: str) -> float:
        start = time.monotonic()
        comfy.wait_history(comfy.queue(camera_graph("adapter/in.png", prompt=prompt)))
        return time.monotonic() - start

    first, second = timed("a"), timed("b")
    comfy.http.post("/free", json={"unload_models": True, "free_memory": True})
    third = timed("c")

    assert first >= 1.0
    assert second < 0.9
    assert third >= 1.0


def test_history_delay_widens_the_success_race(make_standin: Callable[..., Comfy]) -> None:
    """With history_delay_s, /history is still {} right after execution_success (§10.1)."""
    comfy = make_standin(faults=StandinFaults(history_delay_s=1.0))
    comfy.upload("in.png", picture(), subfolder="adapter")
    seen: list[dict[str, Any]] = []

    def on_message(msg: dict[str, Any], pid: str) -> None:
        if msg["type"] == "execution_success":
            seen.append(comfy.history(pid))

    pid, _ = comfy.run_with_ws(
        lambda: comfy.queue(camera_graph("adapter/in.png"), client_id="tester"), on_message=on_message
    )

    assert seen == [{}]
    assert comfy.history(pid)[pid]["status"]["status_str"] == "success"


def test_stale_ws_cleanup_fault(make_standin: Callable[..., Comfy]) -> None:
    """With the ComfyUI bug on, closing an old socket de-registers its same-clientId replacement."""
    comfy = make_standin(faults=StandinFaults(stale_ws_cleanup=True))
    comfy.upload("in.png", picture(), subfolder="adapter")

    async def scenario(client_id: str) -> list[str]:
        async with aiohttp.ClientSession() as http:
            old = await http.ws_connect(f"{comfy.url}/ws?clientId={client_id}")
            await old.receive_json(timeout=5)
            new = await http.ws_connect(f"{comfy.url}/ws?clientId={client_id}")
            await new.receive_json(timeout=5)
            await old.close()
            await asyncio.sleep(0.2)
            await asyncio.to_thread(comfy.queue, camera_graph("adapter/in.png", prompt=client_id), client_id=client_id)
            got: list[str] = []
            with pytest.raises(TimeoutError):
                while True:
                    got.append((await new.receive_json(timeout=2))["type"])
            await new.close()
            return got

    # WHEN the bug is on, the replacement socket receives nothing at all, not even status broadcasts
    assert asyncio.run(scenario("dup")) == []
    # AND with the bug off, the replacement socket gets the whole run
    comfy.server.set_faults(stale_ws_cleanup=False)
    assert "execution_success" in asyncio.run(scenario("dup2"))


# --- unified API --------------------------------------------------------------------------------------------


def wait_unified(comfy: Comfy, job_id: str, timeout: float = WS_TIMEOUT) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        doc = dict(comfy.http.get(f"/api/v1/jobs/{job_id}").json())
        if doc["status"] in ("completed", "failed"):
            return doc
        time.sleep(0.05)
    raise AssertionError(f"unified job {job_id} did not finish")


def test_unified_camera_angle_from_file_url(comfy: Comfy, tmp_path: Path) -> None:
    """POST /api/v1/camera-angle/jobs with a file:// image completes with a file:// result."""
    src = tmp_path / "photo.png"
    src.write_bytes(picture(size=(120, 90)))

    r = comfy.http.post("/api/v1/camera-angle/jobs", json={"image_url": src.as_uri(), "vertical": 2, "steps": 3})
    assert r.status_code == 202
    accepted = r.json()
    doc = wait_unified(comfy, accepted["job_id"])

    assert accepted["status"] == "pending"
    assert doc["status"] == "completed", doc
    assert doc["error"] is None
    assert doc["result_s3_uri"].startswith("file://")
    with Image.open(doc["result_s3_uri"].removeprefix("file://")) as out:
        assert out.format == "PNG"
    entry = comfy.history(doc["comfy_prompt_id"])[doc["comfy_prompt_id"]]
    assert entry["prompt"][2]["11"]["inputs"]["prompt"] == "将镜头转为俯视"
    assert entry["prompt"][2]["14"]["inputs"]["steps"] == 3


def test_unified_qwen_edit_from_loopback_http(comfy: Comfy) -> None:
    """qwen-image-edit jobs fetch http://127.0.0.1 URLs, including optional reference images."""
    base = f"{comfy.url}/view?type=input&subfolder=adapter&filename=in.png"

    r = comfy.http.post(
        "/api/v1/qwen-image-edit/jobs",
        json={"image_url": base, "image2_url": base, "prompt": "black and white sketch", "seed": 7},
    )
    doc = wait_unified(comfy, r.json()["job_id"])

    assert doc["status"] == "completed", doc
    graph = comfy.history(doc["comfy_prompt_id"])[doc["comfy_prompt_id"]]["prompt"][2]
    assert "11" not in graph
    assert "image3" not in graph["3"]["inputs"]
    assert graph["2"]["inputs"]["sampler_name"] == "sa_solver"


def test_unified_validation_and_unknown_job(comfy: Comfy) -> None:
    """Bad bodies are 422 with a reason; an unknown job id is 404."""
    missing_prompt = comfy.http.post("/api/v1/qwen-image-edit/jobs", json={"image_url": "s3://b/k.png"})
    bad_knob = comfy.http.post("/api/v1/camera-angle/jobs", json={"image_url": "s3://b/k.png", "zoom": 3})

    assert missing_prompt.status_code == 422
    assert "prompt" in missing_prompt.json()["detail"]
    assert bad_knob.status_code == 422
    assert "zoom" in bad_knob.json()["detail"]
    assert comfy.http.get(f"/api/v1/jobs/{uuid.uuid4()}").status_code == 404


def test_unified_job_failure_is_reported(comfy: Comfy, tmp_path: Path) -> None:
    """A missing input file or a remote URL ends the job failed with an error."""
    missing = comfy.http.post("/api/v1/camera-angle/jobs", json={"image_url": (tmp_path / "nope.png").as_uri()})
    remote = comfy.http.post(
        "/api/v1/camera-angle/jobs", json={"image_url": "https://example.com/x.png", "prompt": "俯视"}
    )

    for r in (missing, remote):
        doc = wait_unified(comfy, r.json()["job_id"])
        assert doc["status"] == "failed"
        assert doc["error"]


def test_unified_execution_error_fails_job(comfy: Comfy, tmp_path: Path) -> None:
    """An execution_error in ComfyUI surfaces as a failed unified job naming the node."""
    src = tmp_path / "p.png"
    src.write_bytes(picture())
    comfy.server.set_faults(execution_error=1, execution_error_message="boom")

    r = comfy.http.post("/api/v1/camera-angle/jobs", json={"image_url": src.as_uri()})
    doc = wait_unified(comfy, r.json()["job_id"])

    assert doc["status"] == "failed"
    assert "execution_error at node 14" in doc["error"]
    assert "boom" in doc["error"]


def test_unified_s3_in_and_out(make_standin: Callable[..., Comfy], moto_server: str) -> None:
    """s3:// inputs are read and results uploaded to the output bucket through the configured endpoint."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1")
    bucket = f"standin-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="inputs/p.png", Body=picture())
    comfy = make_standin(output_bucket=bucket, s3_endpoint_url=moto_server)

    r = comfy.http.post("/api/v1/camera-angle/jobs", json={"image_url": f"s3://{bucket}/inputs/p.png"})
    doc = wait_unified(comfy, r.json()["job_id"])

    assert doc["status"] == "completed", doc
    key = f"results/camera-angle/{doc['job_id']}.png"
    assert doc["result_s3_uri"] == f"s3://{bucket}/{key}"
    body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    assert Image.open(io.BytesIO(body)).format == "PNG"


# --- command line ---------------------------------------------------------------------------------------------


def test_cli_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    """python -m gpuctl.local.comfyui_standin --port 0 logs its URL, serves, and exits 0 on SIGTERM."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "gpuctl.local.comfyui_standin", "--port", "0", "--output-dir", str(tmp_path / "o")]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) as proc:
        try:
            url = None
            deadline = time.monotonic() + 20
            assert proc.stderr is not None
            while url is None and time.monotonic() < deadline:
                line = proc.stderr.readline()
                if "standin.listening" in line:
                    url = line.split("url=", 1)[1].split()[0]
            assert url is not None
            assert httpx.get(f"{url}/system_stats", timeout=5).json()["system"]["comfyui_version"] == "0.3.64"
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=10) == 0
            assert proc.stdout is not None
            assert proc.stdout.read() == ""
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)


def test_main_rejects_bad_flags() -> None:
    """Unknown flags are a usage error (exit 2)."""
    with pytest.raises(SystemExit) as exc:
        main(["--no-such-flag"])

    assert exc.value.code == 2


# --- behaviour matched to the real ComfyUI 0.3.64 (adapter/comfyui-observed.md) ------------------------------


def slow_graph(image: str, seconds: float, steps: int) -> dict[str, Any]:
    """A model-free override workflow: LoadImage → GpuctlTestSlow → ImageInvert → SaveImage."""
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": image}},
        "2": {"class_type": "GpuctlTestSlow", "inputs": {"image": ["1", 0], "seconds": seconds, "steps": steps}},
        "3": {"class_type": "ImageInvert", "inputs": {"image": ["2", 0]}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "slow"}},
    }


def test_default_is_0_3_64_without_the_jobs_api(make_standin: Callable[..., Comfy]) -> None:
    """By default the stand-in plays 0.3.64: no /api/jobs (404), legacy invalid_prompt, any prompt_id."""
    comfy = make_standin(comfyui_version=StandinConfig().comfyui_version)
    assert comfy.http.get("/system_stats").json()["system"]["comfyui_version"] == "0.3.64"
    assert comfy.http.get(f"/api/jobs/{uuid.uuid4()}").status_code == 404
    assert "error" not in comfy.http.get(f"/api/jobs/{uuid.uuid4()}").text
    r = comfy.post_prompt({"1": {"class_type": "Nope", "inputs": {}}}, prompt_id="NOT-A-UUID")
    assert r.json()["error"]["type"] == "invalid_prompt"


def test_core_image_nodes_run_an_override_workflow(comfy: Comfy) -> None:
    """ImageScale, ImageBlur, ImageStitch, ImageInvert and SaveImage run for real on the CPU."""
    graph = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "adapter/in.png"}},
        "2": {"class_type": "ImageScale", "inputs": {"image": ["1", 0], "upscale_method": "bilinear", "width": 50,
                                                      "height": 0, "crop": "disabled"}},
        "3": {"class_type": "ImageBlur", "inputs": {"image": ["2", 0], "blur_radius": 3, "sigma": 2.0}},
        "4": {"class_type": "ImageInvert", "inputs": {"image": ["2", 0]}},
        "5": {"class_type": "ImageStitch", "inputs": {"image1": ["3", 0], "image2": ["4", 0], "direction": "right",
                                                       "match_image_size": True, "spacing_width": 4,
                                                       "spacing_color": "white"}},
        "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "core/out"}},
    }
    entry = comfy.wait_history(comfy.queue(graph))
    assert entry["status"]["status_str"] == "success"
    (image,) = entry["outputs"]["6"]["images"]
    with Image.open(comfy.server.output_dir / image["subfolder"] / image["filename"]) as out:
        # 96x64 scaled to width 50 keeps its aspect (33 high); two of them side by side with a 4 px strip
        assert out.size == (50 + 4 + 50, 33)


def test_interrupt_is_honoured_only_at_a_progress_step(make_standin: Callable[..., Comfy]) -> None:
    """A node without progress runs to its end despite an interrupt; with steps it stops at the next one."""
    comfy = make_standin()
    comfy.upload("in.png", picture(), subfolder="adapter")
    timings = {}
    for steps in (0, 10):
        pid = comfy.queue(slow_graph("adapter/in.png", 2.0, steps))
        comfy.wait_running(pid)
        time.sleep(0.3)
        asked = time.monotonic()
        comfy.http.post("/interrupt", json={"prompt_id": pid})
        entry = comfy.wait_history(pid)
        timings[steps] = time.monotonic() - asked
        assert entry["status"]["messages"][-1][0] == "execution_interrupted"
    assert timings[0] > 1.2  # the long node without a progress bar ran on (its next check is the next node)
    assert timings[10] < 0.6  # the next progress step took it


def test_interrupt_lag_and_history_delay_are_settable(make_standin: Callable[..., Comfy]) -> None:
    """interrupt_lag_s postpones an interrupt to a later check point; history_delay_s postpones history."""
    comfy = make_standin(faults=StandinFaults(interrupt_lag_s=1.0, history_delay_s=0.5))
    comfy.upload("in.png", picture(), subfolder="adapter")

    seen: dict[str, float] = {}

    def on_message(msg: dict[str, Any], pid: str) -> None:
        if msg["type"] == "progress" and msg["data"]["value"] == 1 and "asked" not in seen:
            seen["asked"] = time.monotonic()
            comfy.http.post("/interrupt", json={"prompt_id": pid})
        if msg["type"] == "execution_interrupted":
            seen["interrupted"] = time.monotonic()
            seen["history_at_event"] = float(bool(comfy.history(pid)))

    pid, _ = comfy.run_with_ws(lambda: comfy.queue(slow_graph("adapter/in.png", 4.0, 20), client_id="tester"),
                                      on_message=on_message)
    assert 1.0 <= seen["interrupted"] - seen["asked"] < 1.8
    assert seen["history_at_event"] == 0.0  # as on 0.3.64: history comes after the event
    assert comfy.history(pid)[pid]["status"]["messages"][-1][0] == "execution_interrupted"


def test_progress_state_comes_before_each_progress(comfy: Comfy) -> None:
    """As in ComfyUI's progress hook, each step sends progress_state first, then progress."""
    _, messages = comfy.run_with_ws(lambda: comfy.queue(slow_graph("adapter/in.png", 0.2, 3), client_id="tester"))
    kinds = [m["type"] for m in messages if m["type"] in ("progress", "progress_state")]
    first_progress = kinds.index("progress")
    assert kinds[first_progress - 1] == "progress_state"
    assert kinds.count("progress") == 3


def test_unified_blocking_shape_holds_status_reads_while_a_job_runs(make_standin: Callable[..., Comfy],
                                                                    tmp_path: Path) -> None:
    """With unified_blocking, a status read sent while the job executes is answered only after it ends."""
    comfy = make_standin(seconds_per_job=1.5, unified_blocking=True)
    image = tmp_path / "in.png"
    image.write_bytes(picture())
    job = comfy.http.post("/api/v1/camera-angle/jobs", json={"image_url": image.as_uri()}).json()
    deadline = time.monotonic() + 10
    while comfy.server.standin.running is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.1)
    sent = time.monotonic()
    doc = comfy.http.get(f"/api/v1/jobs/{job['job_id']}", timeout=20).json()
    assert doc["status"] == "completed" and time.monotonic() - sent > 0.5
    assert doc["finished_at"] <= time.time()


def test_unified_trailing_slash_answers_307(comfy: Comfy, tmp_path: Path) -> None:
    """As FastAPI does, a trailing slash is redirected (307 keeps the method and body)."""
    r = comfy.http.post("/api/v1/camera-angle/jobs/", json={"image_url": "file:///nope.png"})
    assert r.status_code == 307 and r.headers["location"] == "/api/v1/camera-angle/jobs"
