"""The stand-in's "model": real, cheap Pillow transforms that make each job's output recognisable.

None of this imitates Qwen-Image-Edit. The qwen-image-edit graph gets a greyscale line sketch and the
camera-angle graph gets a perspective warp steered by the instruction text, and every result carries a
"gpuctl stand-in" label so nobody mistakes it for the model's work.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFilter, ImageFont, ImageOps

__all__ = [
    "LABEL",
    "RESAMPLING",
    "STITCH_COLORS",
    "CameraMove",
    "camera_warp",
    "parse_camera_move",
    "scale_to_megapixels",
    "sketch",
    "stamp_label",
    "stitch",
]

LABEL = "gpuctl stand-in"


@dataclass(frozen=True)
class CameraMove:
    """A camera move in knob units: vertical/horizontal -2..2 (down..up, left..right), zoom -1..1."""

    vertical: int = 0
    horizontal: int = 0
    zoom: int = 0

    @property
    def is_still(self) -> bool:
        return self == CameraMove()


# The instructions gpuctl.models.build_camera_prompt writes, plus English equivalents. Checked in order,
# longest phrases first, so "稍微向上" wins over a bare "向上".
_VERTICAL_WORDS: tuple[tuple[str, int], ...] = (
    ("俯视", 2),
    ("稍微向上", 1),
    ("向上", 1),
    ("仰视", -2),
    ("稍微向下", -1),
    ("向下", -1),
    ("top-down", 2),
    ("bird", 2),
    ("overhead", 2),
    ("high angle", 1),
    ("low angle", -2),
    ("worm", -2),
    ("tilt up", 1),
    ("tilt down", -1),
)
_ZOOM_WORDS: tuple[tuple[str, int], ...] = (
    ("特写", 1),
    ("拉近", 1),
    ("放大", 1),
    ("广角", -1),
    ("拉远", -1),
    ("缩小", -1),
    ("close-up", 1),
    ("closeup", 1),
    ("zoom in", 1),
    ("wide", -1),
    ("zoom out", -1),
)
_CAMERA_WORDS = ("镜头", "视角", "机位", "camera", "angle", "view", "rotate", "zoom", "pan")


def parse_camera_move(prompt: str) -> CameraMove | None:
    """The camera move an instruction asks for, or None when the text is not about the camera."""
    text = prompt.lower()
    vertical = next((v for word, v in _VERTICAL_WORDS if word in text), 0)
    zoom = next((z for word, z in _ZOOM_WORDS if word in text), 0)
    horizontal = 0
    left = re.search(r"(向左|左|left)", text)
    right = re.search(r"(向右|右|right)", text)
    if left or right:
        big = "90" in text or "大幅" in text
        horizontal = (2 if big else 1) * (-1 if left and not right else 1)
    move = CameraMove(vertical=vertical, horizontal=horizontal, zoom=zoom)
    if move.is_still and not any(word in text for word in _CAMERA_WORDS):
        return None
    return move


def _solve(matrix: list[list[float]], rhs: list[float]) -> list[float]:
    """Gaussian elimination with partial pivoting (8x8 here; no numpy in the stand-in)."""
    n = len(rhs)
    a = [[*row, rhs[i]] for i, row in enumerate(matrix)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(a[r][col]))
        a[col], a[pivot] = a[pivot], a[col]
        if abs(a[col][col]) < 1e-12:
            raise ValueError("degenerate perspective quad")
        for r in range(n):
            if r != col:
                f = a[r][col] / a[col][col]
                a[r] = [x - f * y for x, y in zip(a[r], a[col], strict=True)]
    return [a[i][n] / a[i][i] for i in range(n)]


def _perspective_coeffs(
    dst: list[tuple[float, float]], src: list[tuple[float, float]]
) -> tuple[float, float, float, float, float, float, float, float]:
    """Coefficients for Image.transform(PERSPECTIVE): maps output points ``dst`` to input points ``src``."""
    matrix: list[list[float]] = []
    rhs: list[float] = []
    for (x, y), (u, v) in zip(dst, src, strict=True):
        matrix.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        matrix.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        rhs.extend([u, v])
    c = _solve(matrix, rhs)
    return (c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7])


def camera_warp(image: Image.Image, move: CameraMove, *, seed: int = 0) -> Image.Image:
    """Re-project ``image`` as if the camera moved: a keystone for tilt and pan, a crop for zoom.

    A still move (e.g. "keep the camera") still gets a slight seed-driven turn so that the output
    always differs from the input.
    """
    if move.is_still:
        rng = random.Random(seed)
        move = CameraMove(horizontal=rng.choice((-1, 1)))
    w, h = image.size
    # Looking down (vertical > 0) shrinks the far (top) edge; looking up shrinks the bottom edge.
    squeeze_v = 0.09 * move.vertical
    squeeze_h = 0.09 * move.horizontal
    top_inset = max(0.0, squeeze_v) * w
    bottom_inset = max(0.0, -squeeze_v) * w
    # Turning right brings the right edge closer (taller) and pushes the left edge away (shorter).
    left_inset = max(0.0, squeeze_h) * h
    right_inset = max(0.0, -squeeze_h) * h
    dst = [
        (top_inset, left_inset),
        (w - top_inset, right_inset),
        (w - bottom_inset, h - right_inset),
        (bottom_inset, h - left_inset),
    ]
    src = [(0.0, 0.0), (float(w), 0.0), (float(w), float(h)), (0.0, float(h))]
    warped = image.convert("RGB").transform(
        (w, h),
        Image.Transform.PERSPECTIVE,
        _perspective_coeffs(dst, src),
        Image.Resampling.BICUBIC,
        fillcolor=(24, 24, 28),
    )
    if move.zoom > 0:
        # Close-up: crop the central 70 % and scale back up.
        box = (round(w * 0.15), round(h * 0.15), round(w * 0.85), round(h * 0.85))
        warped = warped.crop(box).resize((w, h), Image.Resampling.LANCZOS)
    elif move.zoom < 0:
        # Wide: shrink into a dark frame.
        small = warped.resize((max(1, round(w * 0.7)), max(1, round(h * 0.7))), Image.Resampling.LANCZOS)
        frame = Image.new("RGB", (w, h), (24, 24, 28))
        frame.paste(small, ((w - small.width) // 2, (h - small.height) // 2))
        warped = frame
    return warped


def sketch(image: Image.Image) -> Image.Image:
    """A greyscale pencil-style line drawing of ``image`` (edge-enhanced contours)."""
    grey = ImageOps.grayscale(image.convert("RGB"))
    lines = grey.filter(ImageFilter.EDGE_ENHANCE_MORE).filter(ImageFilter.CONTOUR)
    return ImageOps.autocontrast(lines, cutoff=1).convert("RGB")


def scale_to_megapixels(image: Image.Image, megapixels: float, step: int, method: str) -> Image.Image:
    """ImageScaleToTotalPixels: scale to about ``megapixels`` MP, sides rounded to ``step``."""
    total = megapixels * 1024 * 1024
    scale = math.sqrt(total / max(1, image.width * image.height))
    step = max(1, step)
    width = max(step, round(image.width * scale / step) * step)
    height = max(step, round(image.height * scale / step) * step)
    return image.resize((width, height), _RESAMPLE.get(method, Image.Resampling.LANCZOS))


_RESAMPLE = {
    "nearest-exact": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "area": Image.Resampling.BOX,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


def stamp_label(image: Image.Image, text: str = LABEL) -> Image.Image:
    """Return a copy of ``image`` with a small white-on-black ``text`` label in the bottom-left corner."""
    out = image.convert("RGB")
    draw = ImageDraw.Draw(out)
    size = max(10, min(out.width, out.height) // 32)
    try:
        font: ImageFont.ImageFont | ImageFont.FreeTypeFont = ImageFont.load_default(size=size)
    except (OSError, ImportError):  # Pillow built without FreeType: the fixed bitmap font
        font = ImageFont.load_default()
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    pad = max(2, size // 4)
    box_h = bottom - top + 2 * pad
    y0 = out.height - box_h - pad
    draw.rectangle((pad, y0, pad + right - left + 2 * pad, y0 + box_h), fill=(0, 0, 0))
    draw.text((2 * pad - left, y0 + pad - top), text, fill=(255, 255, 255), font=font)
    return out


#: ComfyUI's upscale method names → Pillow's filters ("area" has no exact twin; box filtering is its idea).
RESAMPLING: dict[str, Image.Resampling] = {
    "nearest-exact": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "area": Image.Resampling.BOX,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
STITCH_COLORS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255), "black": (0, 0, 0), "red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255),
}


def stitch(first: Image.Image, second: Image.Image, direction: str, match_size: bool, spacing: int,
           color: tuple[int, int, int]) -> Image.Image:
    """ComfyUI's ImageStitch: ``second`` beside ``first`` (right/left) or below/above it (down/up)."""
    horizontal = direction in ("left", "right")
    if match_size:
        if horizontal:
            size = (max(1, int(first.height * second.width / second.height)), first.height)
        else:
            size = (first.width, max(1, int(first.width * second.height / second.width)))
        second = second.resize(size, Image.Resampling.LANCZOS)
    pad = (0, 0, 0) if color not in ((255, 255, 255), (0, 0, 0)) else color  # ComfyUI pads with grey levels only
    if horizontal:
        height = max(first.height, second.height)
        width = first.width + spacing + second.width
    else:
        width = max(first.width, second.width)
        height = first.height + spacing + second.height
    canvas = Image.new("RGB", (width, height), pad)
    a, b = (second, first) if direction in ("left", "up") else (first, second)
    if spacing:
        strip = (a.width, 0, a.width + spacing, height) if horizontal else (0, a.height, width, a.height + spacing)
        canvas.paste(color, strip)
    if horizontal:
        canvas.paste(a, (0, (height - a.height) // 2))
        canvas.paste(b, (a.width + spacing, (height - b.height) // 2))
    else:
        canvas.paste(a, ((width - a.width) // 2, 0))
        canvas.paste(b, ((width - b.width) // 2, a.height + spacing))
    return canvas
