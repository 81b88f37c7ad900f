"""The node classes the stand-in knows, ComfyUI's graph validation, and each node's CPU implementation.

The classes are those of the two reference workflows (camera-angle and qwen-image-edit), the two
alternatives named in the protocol reference §12 (``FluxKontextImageScale``, ``EmptySD3LatentImage``),
ComfyUI's core image nodes (``ImageScale``, ``ImageInvert``, ``ImageBlur``, ``ImageStitch``: model-free
override workflows run on them) and ``GpuctlTestSlow``, a slow node with a progress bar for tests (its
real-ComfyUI twin is in ``bench/comfyui_nodes``), with ComfyUI's input names, types, ranges and output slots.
Validation follows ``execution.validate_prompt``
(reference §3) closely enough that error *shapes* match: the same ``type``/``message``/``details``/
``extra_info`` per failure, the same top-level errors, and the same rule that only nodes reachable from an
output node are validated and run.
"""

from __future__ import annotations

import hashlib
import json
import math
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps
from PIL.PngImagePlugin import PngInfo

from gpuctl.local import standin_images as images

__all__ = [
    "DEFAULT_MODELS",
    "NODES",
    "Catalog",
    "Input",
    "NodeContext",
    "NodeSpec",
    "ValidationResult",
    "execution_order",
    "node_signatures",
    "object_info",
    "resolve_input_file",
    "validate_prompt",
]

# Model files the stand-in pretends to have, per ComfyUI model folder: the names the reference workflows
# and the protocol reference §12 use. Anything else fails validation with value_not_in_list, as on a
# ComfyUI without that file.
DEFAULT_MODELS: dict[str, list[str]] = {
    "checkpoints": ["Qwen-Rapid-AIO-NSFW-v11.safetensors"],
    "diffusion_models": [
        "Qwen-Image-Edit-2509_fp8_e4m3fn.safetensors",
        "qwen_image_edit_2509_fp8_e4m3fn.safetensors",
    ],
    "loras": [
        "Qwen-Image-Edit-2509-Lightning-4steps-V1.0-bf16.safetensors",
        "Qwen-Image-Lightning-8steps-V1.1.safetensors",
        "镜头转换.safetensors",
    ],
    "text_encoders": ["qwen_2.5_vl_7b.safetensors", "qwen_2.5_vl_7b_fp8_scaled.safetensors"],
    "vae": ["qwen_image_vae.safetensors"],
}

SAMPLERS = (
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2", "dpm_2",
    "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral", "dpmpp_2s_ancestral_cfg_pp",
    "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu",
    "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm", "lcm", "ipndm", "ipndm_v", "deis", "res_multistep",
    "res_multistep_cfg_pp", "res_multistep_ancestral", "res_multistep_ancestral_cfg_pp",
    "gradient_estimation", "er_sde", "seeds_2", "seeds_3", "sa_solver", "sa_solver_pece", "ddim", "uni_pc",
    "uni_pc_bh2",
)  # fmt: skip
SCHEDULERS = (
    "simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal", "linear_quadratic",
    "kl_optimal",
)  # fmt: skip
CLIP_TYPES = (
    "stable_diffusion", "stable_cascade", "sd3", "stable_audio", "mochi", "ltxv", "pixart", "cosmos",
    "lumina2", "wan", "hidream", "chroma", "ace", "omnigen2", "qwen_image", "hunyuan_image", "flux2", "ovis",
)  # fmt: skip
UPSCALE_METHODS = ("nearest-exact", "bilinear", "area", "bicubic", "lanczos")
WEIGHT_DTYPES = ("default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2")
KONTEXT_RESOLUTIONS = (
    (672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248), (880, 1184), (944, 1104),
    (1024, 1024), (1104, 944), (1184, 880), (1248, 832), (1328, 800), (1392, 752), (1456, 720), (1504, 688),
    (1568, 672),
)  # fmt: skip
_PRIMITIVES = ("INT", "FLOAT", "STRING", "BOOLEAN")


@dataclass(frozen=True)
class Input:
    """One input of a node class: a link type (MODEL, IMAGE, …), a primitive, or a COMBO."""

    name: str
    type: str
    options: Mapping[str, Any] = field(default_factory=dict)
    choices: tuple[str, ...] = ()
    folder: str | None = None  # COMBO filled from a model folder
    input_files: bool = False  # LoadImage: COMBO of the input dir, checked by custom validation


@dataclass(frozen=True)
class NodeContext:
    """What a running node may see besides its inputs."""

    node_id: str
    input_dir: Path
    output_dir: Path
    prompt: Mapping[str, Any]
    extra_data: Mapping[str, Any]
    save_metadata: bool


# A node returns its output slots and its UI output (or None when it has none).
NodeResult = tuple[tuple[Any, ...], dict[str, Any] | None]


@dataclass(frozen=True)
class NodeSpec:
    """A node class: inputs, outputs, and its implementation."""

    name: str
    display_name: str
    category: str
    required: tuple[Input, ...]
    outputs: tuple[str, ...]
    run: Callable[[NodeContext, dict[str, Any]], NodeResult]
    optional: tuple[Input, ...] = ()
    output_names: tuple[str, ...] = ()
    output_node: bool = False
    python_module: str = "nodes"
    description: str = ""

    def inputs(self) -> tuple[Input, ...]:
        return self.required + self.optional

    def find(self, name: str) -> tuple[Input, str] | None:
        for inp in self.required:
            if inp.name == name:
                return inp, "required"
        for inp in self.optional:
            if inp.name == name:
                return inp, "optional"
        return None


class Catalog:
    """The live lists combos are checked against: model files per folder and files in the input dir."""

    def __init__(self, models: Mapping[str, Sequence[str]], input_dir: Path, version: tuple[int, ...]) -> None:
        self.models = {k: list(v) for k, v in models.items()}
        self.input_dir = input_dir
        self.version = version

    def choices(self, inp: Input) -> list[str]:
        if inp.folder is not None:
            return sorted(self.models.get(inp.folder, []))
        if inp.input_files:
            return sorted(p.relative_to(self.input_dir).as_posix() for p in self.input_dir.rglob("*") if p.is_file())
        return list(inp.choices)

    def required_inputs(self, spec: NodeSpec) -> tuple[Input, ...]:
        # ImageScaleToTotalPixels.resolution_steps became a required input in ComfyUI v0.6.0 (reference §0).
        if spec.name == "ImageScaleToTotalPixels" and self.version < (0, 6, 0):
            return tuple(i for i in spec.required if i.name != "resolution_steps")
        return spec.required

    def optional_inputs(self, spec: NodeSpec) -> tuple[Input, ...]:
        if spec.name == "ImageScaleToTotalPixels" and self.version < (0, 6, 0):
            return spec.optional + tuple(i for i in spec.required if i.name == "resolution_steps")
        return spec.optional

    def input_config(self, inp: Input) -> list[Any]:
        """The object_info form of an input: ``[type, opts]`` or ``[[choices...], opts]`` for a COMBO."""
        if inp.type == "COMBO":
            return [self.choices(inp), dict(inp.options)]
        return [inp.type, dict(inp.options)] if inp.options else [inp.type]


# --- Node implementations -------------------------------------------------------------------------------


def _model(name: str) -> dict[str, Any]:
    return {"kind": "MODEL", "name": name, "loras": [], "patches": []}


def _patched(model: Mapping[str, Any], patch: str) -> dict[str, Any]:
    return {**model, "patches": [*model["patches"], patch]}


def _run_checkpoint(ctx: NodeContext, kw: dict[str, Any]) -> NodeResult:
    name = kw["ckpt_name"]
    return (_model(name), {"kind": "CLIP", "name": name}, {"kind": "VAE", "name": name}), None


def _run_unet(ctx: NodeContext, kw: dict[str, Any]) -> NodeResult:
    return (_model(kw["unet_name"]),), None


def _run_lora(ctx: NodeContext, kw: dict[str, Any]) -> NodeResult:
    model = dict(kw["model"])
    model["loras"] = [*model["loras"], kw["lora_name"]]
    return (model,), None


def _run_aura(ctx: NodeContext, kw: dict[str, Any]) -> NodeResult:
    return (_patched(kw["model"], f"shift={kw['shift']}"),), None


def _run_cfgnorm(ctx: NodeContext, kw: dict[str, Any]) -> NodeResult:
    return (_patched(kw["model"], f"cfgnorm={kw['strength']}"),), None


def _run_clip(ctx: NodeContext, kw: dict[str, Any]) -> NodeResult:
    return ({"kind": "CLIP", "name": kw["clip_name"], "type": kw["type"]},), None


def _run_vae(ctx: NodeContext, kw: dict[str, Any]) -> NodeResult:
    return ({"kind": "VAE", "name": kw["vae_name"]},), None


def resolve_input_file(input_dir: Path, name: str) -> Path | None:
    """The file a LoadImage ``image`` value names (``"sub/x.png"``, ``"x.png [input]"``), or None."""
    base = input_dir
    if name.endswith(" [input]"):
        name = name[: -len(" [input]")]
    elif name.endswith((" [output]", " [temp]")):
        return None  # the stand-in keeps only the input dir in LoadImage's reach
    candidate = (base / name).resolve()
    if not candidate.is_relative_to(base.resolve()) or not candidate.is_file():
        return None
    return candidate


def _run_load_image(ctx: NodeContext, kw: dict[str, Any]) -> NodeResult:
    path = resolve_input_file(ctx.input_dir, kw["image"])
    if path is None:
        raise FileNotFoundError(f"[Errno 2] No such file or directory: '{kw['image']}'")
    with Image.open(path) as opened:
        img = ImageOps.exif_transpose(opened)
        rgb = img.convert("RGB")
        # ComfyUI's MASK is 1 - alpha (white = masked); no alpha channel means an empty mask.
        has_alpha = "A" in img.getbands()
        mask = ImageOps.invert(img.getchannel("A")) if has_alpha else Image.new("L", img.size, 0)
    return ([rgb], [mask]), None


def _run_scale_pixels(ctx: NodeContext, kw: dict[str, Any]) -> NodeResult:
    step = int(kw.get("resolution_steps", 1))
    out = [images.scale_to_megapixels(i, kw["megapixels"], step, kw["upscale_method"]) for i in kw["image"]]
    return (out,), None


def _run_kontext_scale(ctx: NodeContext, kw: dict[str, Any]) -> NodeResult:
    out = []
    for img in kw["image"]:
        aspect = img.width / img.height
        width, height = min(KONTEXT_RESOLUTIONS, key=lambda r: abs(aspect - r[0] / r[1]))
        out.append(ImageOps.fit(img, (width, height), Image.Resampling.LANCZOS))
    return (out,), None


def _run_text_encode(ctx: NodeContext, kw: dict[str, Any]) -> NodeResult:
    refs = [kw[k][0] for k in ("image1", "image2", "image3") if kw.get(k)]
    return ({"kind": "CONDITIONING", "prompt": kw["prompt"], "images": refs},), None


def _run_vae_encode(ctx: NodeContext, kw: dict[str, Any]) -> NodeResult:
    pix = kw["pixels"]
    return ({"images": list(pix), "width": pix[0].width, "height": pix[0].height},), None


def _run_empty_latent(ctx: NodeContext, kw: dict[str, Any]) -> NodeResult:
    return ({"images": None, "width": kw["width"], "height": kw["height"], "batch": kw["batch_size"]},), None


def _is_camera_model(model: Mapping[str, Any]) -> bool:
    return any(("镜头" in lora or "angle" in lora.lower()) for lora in model["loras"])


def _run_ksampler(ctx: NodeContext, kw: dict[str, Any]) -> NodeResult:
    latent = kw["latent_image"]
    positive = kw["positive"]
    sources: list[Image.Image]
    if latent["images"]:
        sources = latent["images"]
    elif positive["images"]:
        size = (latent["width"], latent["height"])
        sources = [ImageOps.fit(positive["images"][0], size)] * latent["batch"]
    else:
        # Nothing to edit: a plain grey canvas, so the output is still a valid image.
        sources = [Image.new("RGB", (latent["width"], latent["height"]), (128, 128, 128))] * latent["batch"]
    move = images.parse_camera_move(positive["prompt"])
    if move is None and _is_camera_model(kw["model"]):
        move = images.CameraMove()
    out = []
    for src in sources:
        edited = images.camera_warp(src, move, seed=kw["seed"]) if move is not None else images.sketch(src)
        if kw["denoise"] < 1.0:
            edited = Image.blend(src.convert("RGB"), edited, kw["denoise"])
        out.append(images.stamp_label(edited))
    return ({"images": out, "width": out[0].width, "height": out[0].height},), None


def _run_vae_decode(ctx: NodeContext, kw: dict[str, Any]) -> NodeResult:
    samples = kw["samples"]
    if not samples["images"]:
        raise RuntimeError("the stand-in cannot decode an empty latent that was never sampled")
    return (list(samples["images"]),), None


def _next_counter(folder: Path, filename: str) -> int:
    """SaveImage's counter: one more than the highest ``<filename>_<NNNNN>_`` already in the folder."""
    best = 0
    if folder.is_dir():
        for entry in folder.iterdir():
            name = entry.name
            if name[: len(filename) + 1] != filename + "_" or not name[len(filename) + 1 :]:
                continue
            digits = name[len(filename) + 1 :].split("_")[0]
            if digits.isdigit() and name[len(filename) + 1 + len(digits) :].startswith("_"):
                best = max(best, int(digits))
    return best + 1


def _run_save_image(ctx: NodeContext, kw: dict[str, Any]) -> NodeResult:
    prefix = Path(kw["filename_prefix"])
    subfolder = prefix.parent.as_posix() if prefix.parent != Path() else ""
    folder = (ctx.output_dir / subfolder).resolve()
    if not folder.is_relative_to(ctx.output_dir.resolve()):
        raise ValueError(
            f"**** ERROR: Saving image outside the output folder is not allowed.\n"
            f" full_output_folder: {folder}\n output_dir: {ctx.output_dir}"
        )
    folder.mkdir(parents=True, exist_ok=True)
    counter = _next_counter(folder, prefix.name)
    results = []
    for img in kw["images"]:
        info = None
        if ctx.save_metadata:
            info = PngInfo()
            info.add_text("prompt", json.dumps(ctx.prompt))
            for key, value in (ctx.extra_data.get("extra_pnginfo") or {}).items():
                info.add_text(key, json.dumps(value))
        file = f"{prefix.name}_{counter:05}_.png"
        img.save(folder / file, pnginfo=info, compress_level=4)
        results.append({"filename": file, "subfolder": subfolder, "type": "output"})
        counter += 1
    return (), {"images": results}


def _run_image_scale(ctx: NodeContext, kw: dict[str, Any]) -> NodeResult:
    width, height = int(kw["width"]), int(kw["height"])
    resample = images.RESAMPLING[kw["upscale_method"]]
    out = []
    for img in kw["image"]:
        if width == 0 and height == 0:
            out.append(img)
            continue
        w = width or max(1, round(img.width * height / img.height))
        h = height or max(1, round(img.height * width / img.width))
        if kw["crop"] == "center":
            out.append(ImageOps.fit(img, (w, h), resample))
        else:
            out.append(img.resize((w, h), resample))
    return (out,), None


def _run_image_invert(ctx: NodeContext, kw: dict[str, Any]) -> NodeResult:
    return ([ImageOps.invert(img.convert("RGB")) for img in kw["image"]],), None


def _run_image_blur(ctx: NodeContext, kw: dict[str, Any]) -> NodeResult:
    from PIL import ImageFilter

    # ComfyUI convolves with a (2 * blur_radius + 1) Gaussian kernel of the given sigma.
    radius = min(float(kw["sigma"]), float(kw["blur_radius"]))
    return ([img.filter(ImageFilter.GaussianBlur(radius)) for img in kw["image"]],), None


def _run_image_stitch(ctx: NodeContext, kw: dict[str, Any]) -> NodeResult:
    firsts, seconds = kw["image1"], kw.get("image2")
    if not seconds:
        return (list(firsts),), None
    color = images.STITCH_COLORS[kw["spacing_color"]]
    spacing = int(kw["spacing_width"])
    spacing += spacing % 2
    out = []
    for i in range(max(len(firsts), len(seconds))):
        first = firsts[min(i, len(firsts) - 1)].convert("RGB")
        second = seconds[min(i, len(seconds) - 1)].convert("RGB")
        out.append(images.stitch(first, second, kw["direction"], bool(kw["match_image_size"]), spacing, color))
    return (out,), None


def _run_test_slow(ctx: NodeContext, kw: dict[str, Any]) -> NodeResult:
    # The stand-in's worker spends ``seconds`` (in ``steps`` progress steps) before this runs.
    return (list(kw["image"]),), None


def _link(name: str, type_: str) -> Input:
    return Input(name, type_)


def _float(name: str, default: float, lo: float, hi: float, step: float = 0.01) -> Input:
    return Input(name, "FLOAT", {"default": default, "min": lo, "max": hi, "step": step})


def _int(name: str, default: int, lo: int, hi: int, **extra: Any) -> Input:
    return Input(name, "INT", {"default": default, "min": lo, "max": hi, **extra})


def _combo(name: str, choices: Sequence[str], **opts: Any) -> Input:
    return Input(name, "COMBO", dict(opts), choices=tuple(choices))


def _files(name: str, folder: str) -> Input:
    return Input(name, "COMBO", folder=folder)


_SPECS = (
    NodeSpec(
        "CheckpointLoaderSimple",
        "Load Checkpoint",
        "loaders",
        (_files("ckpt_name", "checkpoints"),),
        ("MODEL", "CLIP", "VAE"),
        _run_checkpoint,
        description="Loads a diffusion model checkpoint.",
    ),
    NodeSpec(
        "UNETLoader",
        "Load Diffusion Model",
        "advanced/loaders",
        (_files("unet_name", "diffusion_models"), _combo("weight_dtype", WEIGHT_DTYPES)),
        ("MODEL",),
        _run_unet,
    ),
    NodeSpec(
        "LoraLoaderModelOnly",
        "LoraLoaderModelOnly",
        "loaders",
        (_link("model", "MODEL"), _files("lora_name", "loras"), _float("strength_model", 1.0, -100.0, 100.0)),
        ("MODEL",),
        _run_lora,
    ),
    NodeSpec(
        "ModelSamplingAuraFlow",
        "ModelSamplingAuraFlow",
        "advanced/model",
        (_link("model", "MODEL"), _float("shift", 1.73, 0.0, 100.0)),
        ("MODEL",),
        _run_aura,
        python_module="comfy_extras.nodes_model_advanced",
    ),
    NodeSpec(
        "CFGNorm",
        "CFGNorm",
        "advanced/guidance",
        (_link("model", "MODEL"), _float("strength", 1.0, 0.0, 100.0)),
        ("MODEL",),
        _run_cfgnorm,
        optional=(Input("pre_cfg", "BOOLEAN", {"default": False}),),
        output_names=("patched_model",),
        python_module="comfy_extras.nodes_cfg",
    ),
    NodeSpec(
        "CLIPLoader",
        "Load CLIP",
        "advanced/loaders",
        (_files("clip_name", "text_encoders"), _combo("type", CLIP_TYPES)),
        ("CLIP",),
        _run_clip,
        optional=(_combo("device", ("default", "cpu"), advanced=True),),
    ),
    NodeSpec("VAELoader", "Load VAE", "loaders", (_files("vae_name", "vae"),), ("VAE",), _run_vae),
    NodeSpec(
        "LoadImage",
        "Load Image",
        "image",
        (Input("image", "COMBO", {"image_upload": True}, input_files=True),),
        ("IMAGE", "MASK"),
        _run_load_image,
    ),
    NodeSpec(
        "ImageScaleToTotalPixels",
        "Scale Image to Total Pixels",
        "image/upscaling",
        (
            _link("image", "IMAGE"),
            _combo("upscale_method", UPSCALE_METHODS),
            _float("megapixels", 1.0, 0.01, 16.0),
            _int("resolution_steps", 1, 1, 256),
        ),
        ("IMAGE",),
        _run_scale_pixels,
        python_module="comfy_extras.nodes_post_processing",
    ),
    NodeSpec(
        "FluxKontextImageScale",
        "FluxKontextImageScale",
        "advanced/conditioning/flux",
        (_link("image", "IMAGE"),),
        ("IMAGE",),
        _run_kontext_scale,
        python_module="comfy_extras.nodes_flux",
    ),
    NodeSpec(
        "TextEncodeQwenImageEditPlus",
        "TextEncodeQwenImageEditPlus",
        "advanced/conditioning",
        (_link("clip", "CLIP"), Input("prompt", "STRING", {"multiline": True, "dynamicPrompts": True})),
        ("CONDITIONING",),
        _run_text_encode,
        optional=(
            _link("vae", "VAE"),
            _link("image1", "IMAGE"),
            _link("image2", "IMAGE"),
            _link("image3", "IMAGE"),
        ),
        python_module="comfy_extras.nodes_qwen",
    ),
    NodeSpec(
        "VAEEncode",
        "VAE Encode",
        "latent",
        (_link("pixels", "IMAGE"), _link("vae", "VAE")),
        ("LATENT",),
        _run_vae_encode,
    ),
    NodeSpec(
        "EmptyLatentImage",
        "Empty Latent Image",
        "latent",
        (
            _int("width", 512, 16, 16384, step=8),
            _int("height", 512, 16, 16384, step=8),
            _int("batch_size", 1, 1, 4096),
        ),
        ("LATENT",),
        _run_empty_latent,
    ),
    NodeSpec(
        "EmptySD3LatentImage",
        "EmptySD3LatentImage",
        "latent/sd3",
        (
            _int("width", 1024, 16, 16384, step=16),
            _int("height", 1024, 16, 16384, step=16),
            _int("batch_size", 1, 1, 4096),
        ),
        ("LATENT",),
        _run_empty_latent,
        python_module="comfy_extras.nodes_sd3",
    ),
    NodeSpec(
        "KSampler",
        "KSampler",
        "sampling",
        (
            _link("model", "MODEL"),
            _int("seed", 0, 0, 0xFFFFFFFFFFFFFFFF, control_after_generate=True),
            _int("steps", 20, 1, 10000),
            _float("cfg", 8.0, 0.0, 100.0, 0.1),
            _combo("sampler_name", SAMPLERS),
            _combo("scheduler", SCHEDULERS),
            _link("positive", "CONDITIONING"),
            _link("negative", "CONDITIONING"),
            _link("latent_image", "LATENT"),
            _float("denoise", 1.0, 0.0, 1.0),
        ),
        ("LATENT",),
        _run_ksampler,
    ),
    NodeSpec(
        "VAEDecode",
        "VAE Decode",
        "latent",
        (_link("samples", "LATENT"), _link("vae", "VAE")),
        ("IMAGE",),
        _run_vae_decode,
    ),
    NodeSpec(
        "SaveImage",
        "Save Image",
        "image",
        (_link("images", "IMAGE"), Input("filename_prefix", "STRING", {"default": "ComfyUI"})),
        (),
        _run_save_image,
        output_node=True,
        description="Saves the input images to your ComfyUI output directory.",
    ),
)

#: ComfyUI's core image nodes, so that model-free override workflows run on the stand-in (local mode, tests),
#: plus ``GpuctlTestSlow``: a node that takes ``seconds`` in ``steps`` progress steps (0: none, one long step
#: without a progress bar), interruptible at each step. Real ComfyUI gets it from ``bench/comfyui_nodes``.
_CORE_IMAGE_SPECS = (
    NodeSpec(
        "ImageScale",
        "Upscale Image",
        "image/upscaling",
        (
            _link("image", "IMAGE"),
            _combo("upscale_method", UPSCALE_METHODS),
            _int("width", 512, 0, 16384, step=1),
            _int("height", 512, 0, 16384, step=1),
            _combo("crop", ("disabled", "center")),
        ),
        ("IMAGE",),
        _run_image_scale,
    ),
    NodeSpec("ImageInvert", "Invert Image", "image", (_link("image", "IMAGE"),), ("IMAGE",), _run_image_invert),
    NodeSpec(
        "ImageBlur",
        "Image Blur",
        "image/postprocessing",
        (_link("image", "IMAGE"), _int("blur_radius", 1, 1, 31, step=1), _float("sigma", 1.0, 0.1, 10.0, 0.1)),
        ("IMAGE",),
        _run_image_blur,
        python_module="comfy_extras.nodes_post_processing",
    ),
    NodeSpec(
        "ImageStitch",
        "Image Stitch",
        "image/transform",
        (
            _link("image1", "IMAGE"),
            _combo("direction", ("right", "down", "left", "up"), default="right"),
            Input("match_image_size", "BOOLEAN", {"default": True}),
            _int("spacing_width", 0, 0, 1024, step=2),
            _combo("spacing_color", ("white", "black", "red", "green", "blue"), default="white"),
        ),
        ("IMAGE",),
        _run_image_stitch,
        optional=(_link("image2", "IMAGE"),),
        python_module="comfy_extras.nodes_images",
        description="Stitches image2 to image1 in the specified direction.",
    ),
    NodeSpec(
        "GpuctlTestSlow",
        "Slow pass-through (gpuctl test node)",
        "gpuctl/testing",
        (_link("image", "IMAGE"), _float("seconds", 1.0, 0.0, 3600.0, 0.01), _int("steps", 10, 0, 10000)),
        ("IMAGE",),
        _run_test_slow,
        python_module="custom_nodes.gpuctl_test_nodes",
        description="Passes the image through after `seconds`, reporting `steps` progress steps.",
    ),
)

NODES: dict[str, NodeSpec] = {spec.name: spec for spec in (*_SPECS, *_CORE_IMAGE_SPECS)}


def object_info(spec: NodeSpec, catalog: Catalog) -> dict[str, Any]:
    """The ``GET /object_info`` entry of one class (reference §8)."""
    required = catalog.required_inputs(spec)
    optional = catalog.optional_inputs(spec)
    info: dict[str, Any] = {
        "input": {
            "required": {i.name: catalog.input_config(i) for i in required},
            "optional": {i.name: catalog.input_config(i) for i in optional},
        },
        "input_order": {"required": [i.name for i in required], "optional": [i.name for i in optional]},
        "is_input_list": False,
        "output": list(spec.outputs),
        "output_is_list": [False] * len(spec.outputs),
        "output_name": list(spec.output_names or spec.outputs),
        "name": spec.name,
        "display_name": spec.display_name,
        "description": spec.description,
        "python_module": spec.python_module,
        "category": spec.category,
        "output_node": spec.output_node,
    }
    if spec.output_node:
        info["input"]["hidden"] = {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}
    if not optional:
        del info["input"]["optional"]
        del info["input_order"]["optional"]
    return info


# --- Validation (reference §3) -----------------------------------------------------------------------------


@dataclass
class ValidationResult:
    """The outcome of validate_prompt: ``(ok, error, good_outputs, node_errors)`` in ComfyUI's terms."""

    ok: bool
    error: dict[str, Any] | None
    good_outputs: list[str]
    node_errors: dict[str, Any]


class _CycleError(Exception):
    def __init__(self, path: list[str]) -> None:
        super().__init__(" -> ".join(path))
        self.path = path


def _full_type_name(exc: BaseException) -> str:
    module = type(exc).__module__
    name = type(exc).__qualname__
    return name if module in (None, "builtins") else f"{module}.{name}"


def _error(type_: str, message: str, details: str, extra_info: dict[str, Any]) -> dict[str, Any]:
    return {"type": type_, "message": message, "details": details, "extra_info": extra_info}


Validated = dict[str, tuple[bool, list[dict[str, Any]], str]]


class _Validator:
    def __init__(self, prompt: dict[str, Any], catalog: Catalog) -> None:
        self.prompt = prompt
        self.catalog = catalog
        self.validated: Validated = {}
        self.visiting: list[str] = []

    def node(self, unique_id: str) -> tuple[bool, list[dict[str, Any]], str]:
        if unique_id in self.validated:
            return self.validated[unique_id]
        if unique_id in self.visiting:
            raise _CycleError([*self.visiting[self.visiting.index(unique_id) :], unique_id])
        self.visiting.append(unique_id)
        try:
            result = self._node(unique_id)
        finally:
            self.visiting.pop()
        self.validated[unique_id] = result
        return result

    def _node(self, unique_id: str) -> tuple[bool, list[dict[str, Any]], str]:
        node = self.prompt[unique_id]
        spec = NODES[node["class_type"]]
        inputs = node.setdefault("inputs", {})
        errors: list[dict[str, Any]] = []
        valid = True
        required = self.catalog.required_inputs(spec)
        for inp in (*required, *self.catalog.optional_inputs(spec)):
            x = inp.name
            info = self.catalog.input_config(inp)
            if x not in inputs:
                if inp in required:
                    errors.append(_error("required_input_missing", "Required input is missing", x, {"input_name": x}))
                continue
            val = inputs[x]
            if isinstance(val, list):
                if len(val) != 2:
                    errors.append(
                        _error(
                            "bad_linked_input",
                            "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                            x,
                            {"input_name": x, "input_config": info, "received_value": val},
                        )
                    )
                    continue
                o_id = val[0]
                # Like ComfyUI, a dangling link raises here (KeyError) and is reported by the caller.
                received_type = NODES[self.prompt[o_id]["class_type"]].outputs[val[1]]
                if received_type != inp.type:
                    errors.append(
                        _error(
                            "return_type_mismatch",
                            "Return type mismatch between linked nodes",
                            f"{x}, received_type({received_type}) mismatch input_type({inp.type})",
                            {
                                "input_name": x,
                                "input_config": info,
                                "received_type": received_type,
                                "linked_node": val,
                            },
                        )
                    )
                    continue
                try:
                    ok, _, _ = self.node(o_id)
                except _CycleError:
                    raise
                except Exception as ex:
                    reasons = [
                        _error(
                            "exception_during_inner_validation",
                            "Exception when validating inner node",
                            str(ex),
                            {
                                "input_name": x,
                                "input_config": info,
                                "exception_message": str(ex),
                                "exception_type": _full_type_name(ex),
                                "traceback": traceback.format_tb(ex.__traceback__),
                                "linked_node": val,
                            },
                        )
                    ]
                    self.validated[o_id] = (False, reasons, o_id)
                    valid = False
                    continue
                if not ok:
                    valid = False
                continue
            try:
                if isinstance(val, dict) and "__value__" in val:
                    val = val["__value__"]
                    inputs[x] = val
                if inp.type == "INT":
                    val = int(val)
                elif inp.type == "FLOAT":
                    val = float(val)
                elif inp.type == "STRING":
                    val = str(val)
                elif inp.type == "BOOLEAN":
                    val = bool(val)
                inputs[x] = val
            except Exception as ex:
                errors.append(
                    _error(
                        "invalid_input_type",
                        f"Failed to convert an input value to a {inp.type} value",
                        f"{x}, {val}, {ex}",
                        {
                            "input_name": x,
                            "input_config": info,
                            "received_value": val,
                            "exception_message": str(ex),
                        },
                    )
                )
                continue
            if inp.input_files:
                continue  # checked by the node's custom validation below, as LoadImage does
            opts = inp.options
            if "min" in opts and val < opts["min"]:
                errors.append(
                    _error(
                        "value_smaller_than_min",
                        f"Value {val} smaller than min of {opts['min']}",
                        x,
                        {"input_name": x, "input_config": info, "received_value": val},
                    )
                )
                continue
            if "max" in opts and val > opts["max"]:
                errors.append(
                    _error(
                        "value_bigger_than_max",
                        f"Value {val} bigger than max of {opts['max']}",
                        x,
                        {"input_name": x, "input_config": info, "received_value": val},
                    )
                )
                continue
            if inp.type == "COMBO":
                choices = self.catalog.choices(inp)
                if not isinstance(val, str | int | float | bool) or val not in choices:
                    many = len(choices) > 20
                    listed = f"(list of length {len(choices)})" if many else str(choices)
                    errors.append(
                        _error(
                            "value_not_in_list",
                            "Value not in list",
                            f"{x}: '{val}' not in {listed}",
                            {"input_name": x, "input_config": None if many else info, "received_value": val},
                        )
                    )
        for inp in spec.required:
            if inp.input_files and isinstance(inputs.get(inp.name), str):
                name = inputs[inp.name]
                if resolve_input_file(self.catalog.input_dir, name) is None:
                    errors.append(
                        _error(
                            "custom_validation_failed",
                            "Custom validation failed for node",
                            f"{inp.name} - Invalid image file: {name}",
                            {"input_name": inp.name},
                        )
                    )
        if errors or not valid:
            return (False, errors, unique_id)
        return (True, [], unique_id)


def _title(node: Mapping[str, Any]) -> Any:
    meta = node.get("_meta")
    return meta.get("title") if isinstance(meta, dict) else None


def validate_prompt(
    prompt: dict[str, Any], catalog: Catalog, partial_targets: Sequence[str] | None = None
) -> ValidationResult:
    """ComfyUI's ``validate_prompt``: casts literals in place and reports errors in ComfyUI's shapes."""
    legacy = catalog.version < (0, 12, 0)
    outputs: list[str] = []
    for x, node in prompt.items():
        if "class_type" not in node:
            if legacy:
                err = _error(
                    "invalid_prompt", "Cannot execute because a node is missing the class_type property.",
                    f"Node ID '#{x}'", {},
                )  # fmt: skip
            else:
                title = _title(node)
                err = _error(
                    "missing_node_type",
                    f"Node '{title or f'ID #{x}'}' has no class_type. "
                    "The workflow may be corrupted or a custom node is missing.",
                    f"Node ID '#{x}'",
                    {"node_id": x, "class_type": None, "node_title": title},
                )
            return ValidationResult(False, err, [], {})
        class_type = node["class_type"]
        spec = NODES.get(class_type) if isinstance(class_type, str) else None
        if spec is None:
            if legacy:
                err = _error(
                    "invalid_prompt", f"Cannot execute because node {class_type} does not exist.",
                    f"Node ID '#{x}'", {},
                )  # fmt: skip
            else:
                title = _title(node) or class_type
                err = _error(
                    "missing_node_type",
                    f"Node '{title}' not found. The custom node may not be installed.",
                    f"Node ID '#{x}'",
                    {"node_id": x, "class_type": class_type, "node_title": title},
                )
            return ValidationResult(False, err, [], {})
        if spec.output_node and (partial_targets is None or x in partial_targets):
            outputs.append(x)
    if not outputs:
        return ValidationResult(False, _error("prompt_no_outputs", "Prompt has no outputs", "", {}), [], {})

    validator = _Validator(prompt, catalog)
    good: list[str] = []
    failed: list[tuple[str, list[dict[str, Any]]]] = []
    node_errors: dict[str, Any] = {}
    for o in outputs:
        try:
            valid, reasons, _ = validator.node(o)
        except _CycleError as cyc:
            start = cyc.path[0]
            details = " -> ".join(f"{n} ({prompt[n]['class_type']})" for n in cyc.path)
            reasons = [
                _error(
                    "dependency_cycle", "Dependency cycle detected", details,
                    {"node_id": start, "cycle_nodes": cyc.path[:-1]},
                )
            ]  # fmt: skip
            validator.validated[start] = (False, reasons, start)
            valid, reasons = False, (reasons if start == o else [])
        except Exception as ex:
            reasons = [
                _error(
                    "exception_during_validation",
                    "Exception when validating node",
                    str(ex),
                    {
                        "exception_type": _full_type_name(ex),
                        "traceback": traceback.format_tb(ex.__traceback__),
                    },
                )
            ]
            validator.validated[o] = (False, reasons, o)
            valid = False
        if valid:
            good.append(o)
            continue
        if reasons:
            failed.append((o, reasons))
        for node_id, (ok, node_reasons, _) in validator.validated.items():
            # Downstream nodes that failed only because something upstream failed carry no reasons and
            # are left out, as in ComfyUI.
            if not ok and node_reasons:
                entry = node_errors.setdefault(
                    node_id,
                    {
                        "errors": node_reasons,
                        "dependent_outputs": [],
                        "class_type": prompt[node_id]["class_type"],
                    },
                )
                entry["dependent_outputs"].append(o)
    if not good:
        details = "\n".join(f"{e['message']}: {e['details']}" for _, errs in failed for e in errs)
        err = _error("prompt_outputs_failed_validation", "Prompt outputs failed validation", details, {})
        return ValidationResult(False, err, [], node_errors)
    return ValidationResult(True, None, good, node_errors)


# --- Execution planning -------------------------------------------------------------------------------


def _links(node: Mapping[str, Any]) -> list[tuple[str, str, int]]:
    spec = NODES[node["class_type"]]
    out = []
    for inp in spec.inputs():
        val = node["inputs"].get(inp.name)
        if isinstance(val, list) and len(val) == 2:
            out.append((inp.name, str(val[0]), int(val[1])))
    return out


def execution_order(prompt: Mapping[str, Any], outputs: Sequence[str]) -> list[str]:
    """Nodes to run for ``outputs``, dependencies first (nodes not reachable from an output are skipped)."""
    order: list[str] = []
    seen: set[str] = set()

    def visit(node_id: str) -> None:
        if node_id in seen:
            return
        seen.add(node_id)
        for _, src, _ in _links(prompt[node_id]):
            visit(src)
        order.append(node_id)

    for o in outputs:
        visit(o)
    return order


def node_signatures(prompt: Mapping[str, Any], order: Sequence[str], input_dir: Path) -> dict[str, str]:
    """A cache key per node: class, literal inputs and upstream keys; LoadImage also hashes the file.

    Same idea as ComfyUI's input-signature cache: a node whose key did not change is not run again.
    """
    sigs: dict[str, str] = {}
    for node_id in order:
        node = prompt[node_id]
        spec = NODES[node["class_type"]]
        parts: dict[str, Any] = {"class_type": node["class_type"]}
        for inp in spec.inputs():
            if inp.name not in node["inputs"]:
                continue
            val = node["inputs"][inp.name]
            if isinstance(val, list) and len(val) == 2:
                parts[inp.name] = ["link", sigs[str(val[0])], val[1]]
            else:
                parts[inp.name] = val
                if inp.input_files:
                    path = resolve_input_file(input_dir, str(val))
                    parts["file_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest() if path else None
        sigs[node_id] = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
    return sigs


def progress_steps(node: Mapping[str, Any]) -> int:
    """How many progress-bar steps a node reports (the sampler's and the test node's; 0 for the rest)."""
    if node["class_type"] == "KSampler":
        return max(1, int(node["inputs"]["steps"]))
    if node["class_type"] == "GpuctlTestSlow":
        return max(0, int(node["inputs"]["steps"]))
    return 0


def own_seconds(node: Mapping[str, Any]) -> float:
    """The time a node takes besides the job's budget (only the test node has one)."""
    if node["class_type"] == "GpuctlTestSlow":
        return max(0.0, float(node["inputs"]["seconds"]))
    return 0.0


def sampler_inputs_summary(node: Mapping[str, Any]) -> dict[str, list[Any]]:
    """``current_inputs`` of an execution_error: input name -> one-element list, objects stringified."""
    out: dict[str, list[Any]] = {}
    for name, val in node["inputs"].items():
        if isinstance(val, list):
            out[name] = [f"<linked output {val[0]}:{val[1]}>"]
        elif isinstance(val, str | int | float | bool) or val is None:
            out[name] = [val]
        else:
            out[name] = [str(val)]
    return out


def aspect_of(width: int, height: int) -> float:
    return width / height if height else math.inf
