"""Observe a ComfyUI server's behaviour on the paths the adapter depends on, to compare a real ComfyUI with the
stand-in (adapter/comfyui-observed.md records what a real 0.3.64 answered).

Run:  .venv/bin/python bench/observe_comfyui.py http://127.0.0.1:8188 --input-dir /opt/ComfyUI/input
A real server needs ``bench/comfyui_nodes/gpuctl_test_nodes.py`` in its ``custom_nodes/``; the stand-in has the
node built in. Model-free workflows only (LoadImage, GpuctlTestSlow, ImageScale/Blur/Invert/Stitch, SaveImage).
Prints one line per observation.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import time
import uuid
from typing import Any

import aiohttp
import httpx
from PIL import Image


def _graph(image: str, seconds: float, steps: int, prefix: str) -> dict[str, Any]:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": image}},
        "2": {"class_type": "GpuctlTestSlow", "inputs": {"image": ["1", 0], "seconds": seconds, "steps": steps}},
        "3": {"class_type": "ImageInvert", "inputs": {"image": ["2", 0]}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": prefix}},
    }


async def _run(url: str, graph: dict[str, Any], interrupt_after: float | None,
               body: Any = None) -> dict[str, Any]:
    """Queue ``graph`` with a WebSocket open; optionally interrupt after N s; time the events."""
    client_id = uuid.uuid4().hex
    out: dict[str, Any] = {"kinds": []}
    async with aiohttp.ClientSession() as http, http.ws_connect(f"{url}/ws?clientId={client_id}") as ws:
        await ws.receive(timeout=10)
        r = await http.post(f"{url}/prompt", json={"prompt": graph, "client_id": client_id})
        prompt_id = (await r.json())["prompt_id"]
        out["prompt_id"] = prompt_id
        started = time.monotonic()
        asked: float | None = None
        async with asyncio.timeout(60):
            while True:
                if interrupt_after is not None and asked is None and time.monotonic() - started >= interrupt_after:
                    asked = time.monotonic()
                    payload = {"prompt_id": prompt_id} if body is None else body
                    await http.post(f"{url}/interrupt", data=payload if isinstance(payload, str) else None,
                                    json=None if isinstance(payload, str) else payload)
                try:
                    raw = await ws.receive(timeout=0.05)
                except TimeoutError:
                    continue
                if raw.type != aiohttp.WSMsgType.TEXT:
                    continue
                msg = json.loads(raw.data)
                out["kinds"].append(msg["type"])
                if msg["type"] == "execution_interrupted":
                    out["interrupt_ms"] = round((time.monotonic() - (asked or started)) * 1000)
                    h = await (await http.get(f"{url}/history/{prompt_id}")).json()
                    out["history_at_event"] = bool(h)
                    t0 = time.monotonic()
                    while not (await (await http.get(f"{url}/history/{prompt_id}")).json()):
                        await asyncio.sleep(0.02)
                    out["history_after_ms"] = round((time.monotonic() - t0) * 1000)
                if msg["type"] == "executing" and msg["data"].get("node") is None:
                    break
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url")
    args = parser.parse_args()
    url = args.url.rstrip("/")
    http = httpx.Client(base_url=url, timeout=30)
    version = http.get("/system_stats").json()["system"]["comfyui_version"]
    print(f"version: {version}")
    jobs = http.get(f"/api/jobs/{uuid.uuid4()}")
    print(f"GET /api/jobs/<id>: {jobs.status_code} {jobs.text[:40]!r}")
    buf = io.BytesIO()
    Image.new("RGB", (96, 64), (200, 90, 40)).save(buf, "PNG")
    up = http.post("/upload/image", files={"image": ("observe.png", buf.getvalue(), "image/png")},
                   data={"subfolder": "gpuctl", "overwrite": "true"}).json()
    image = f"{up['subfolder']}/{up['name']}"
    lora = http.get("/object_info/LoraLoaderModelOnly").json()["LoraLoaderModelOnly"]["input"]["required"]
    stitch = http.get("/object_info/ImageStitch").json()["ImageStitch"]["input"]["required"]
    print(f"combo forms: LoraLoaderModelOnly.lora_name {json.dumps(lora['lora_name'])[:60]}; "
          f"ImageStitch.direction {json.dumps(stitch['direction'])[:60]}")
    for steps in (10, 0):
        seen = asyncio.run(_run(url, _graph(image, 3.0, steps, f"gpuctl/observe-{steps}"), 0.6))
        order = [k for k in seen["kinds"] if k in ("progress", "progress_state")][:2]
        print(f"interrupt 0.6 s into a 3 s node with {steps} progress steps: execution_interrupted after "
              f"{seen.get('interrupt_ms')} ms; history at the event: {seen.get('history_at_event')}, "
              f"{seen.get('history_after_ms')} ms later; first progress messages {order}")
    seen = asyncio.run(_run(url, _graph(image, 2.0, 4, "gpuctl/observe-global"), 0.5, body="not json"))
    print(f"/interrupt with a body that is not JSON: interrupted after {seen.get('interrupt_ms')} ms (global)")
    graph = _graph(image, 0.2, 2, "gpuctl/observe-cache")
    first = asyncio.run(_run(url, graph, None))
    again = asyncio.run(_run(url, graph, None))
    outputs = http.get(f"/history/{again['prompt_id']}").json()[again["prompt_id"]]["outputs"]
    print(f"identical prompt again: cached, outputs listed: {bool(outputs)} ({'execution_cached' in again['kinds']})")
    core = {
        "1": {"class_type": "LoadImage", "inputs": {"image": image}},
        "2": {"class_type": "ImageScale", "inputs": {"image": ["1", 0], "upscale_method": "bilinear", "width": 50,
                                                      "height": 0, "crop": "disabled"}},
        "3": {"class_type": "ImageBlur", "inputs": {"image": ["2", 0], "blur_radius": 3, "sigma": 2.0}},
        "4": {"class_type": "ImageInvert", "inputs": {"image": ["2", 0]}},
        "5": {"class_type": "ImageStitch", "inputs": {"image1": ["3", 0], "image2": ["4", 0], "direction": "right",
                                                       "match_image_size": True, "spacing_width": 4,
                                                       "spacing_color": "white"}},
        "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "gpuctl/observe-core"}},
    }
    ran = asyncio.run(_run(url, core, None))
    entry = http.get(f"/history/{ran['prompt_id']}").json()[ran["prompt_id"]]
    (saved,) = entry["outputs"]["6"]["images"]
    view = http.get("/view", params={"filename": saved["filename"], "subfolder": saved["subfolder"]})
    with Image.open(io.BytesIO(view.content)) as img:
        print(f"core image nodes (scale 96x64 to width 50, blur, invert, stitch right with 4 px): {img.size}")
    http.post("/history", json={"delete": [first["prompt_id"], again["prompt_id"], ran["prompt_id"]]})
    gone = http.get(f"/history/{ran['prompt_id']}").json()
    print(f"POST /history delete: entry gone {gone == {}}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
