"""``GpuctlTestSlow`` for a real ComfyUI: the stand-in's slow, progress-reporting test node.

Copy (or symlink) this file into ComfyUI's ``custom_nodes/`` to run the model-free override workflows of
``adapter/comfyui-observed.md`` on a real server (CPU is enough). It passes its image through after ``seconds``,
reporting ``steps`` progress steps (0: one long step without a progress bar); ComfyUI checks for an interrupt at
each step, as it does in a sampler.
"""

import time

import comfy.utils


class GpuctlTestSlow:
    @classmethod
    def INPUT_TYPES(cls):  # ComfyUI's node API names it so
        return {"required": {
            "image": ("IMAGE",),
            "seconds": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 3600.0, "step": 0.01}),
            "steps": ("INT", {"default": 10, "min": 0, "max": 10000}),
        }}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "run"
    CATEGORY = "gpuctl/testing"

    def run(self, image, seconds, steps):
        if steps <= 0:
            time.sleep(seconds)
            return (image,)
        bar = comfy.utils.ProgressBar(steps)
        for _ in range(steps):
            time.sleep(seconds / steps)
            bar.update(1)
        return (image,)


NODE_CLASS_MAPPINGS = {"GpuctlTestSlow": GpuctlTestSlow}
NODE_DISPLAY_NAME_MAPPINGS = {"GpuctlTestSlow": "Slow pass-through (gpuctl test node)"}
