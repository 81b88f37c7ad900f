"""The demo's sample picture, drawn with Pillow: a lake under mountains at sunset, with a little house.

Drawn on the fly rather than shipped as a binary: the same seed gives the same pixels, and there is a
clear subject (the house, the sun) so that the stand-in's camera-angle warp and edit are easy to see.
"""

from __future__ import annotations

import io
import math
import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

__all__ = ["SAMPLE_SIZE", "sample_png", "write_sample"]

SAMPLE_SIZE = (640, 426)


def _lerp(a: tuple[int, int, int], b: tuple[int, int, int], t: float) -> tuple[int, int, int]:
    return (round(a[0] + (b[0] - a[0]) * t), round(a[1] + (b[1] - a[1]) * t), round(a[2] + (b[2] - a[2]) * t))


def _ridge(rng: random.Random, width: int, base: float, amplitude: float) -> list[tuple[float, float]]:
    """A mountain skyline: a few summed sines with random phases, plus jitter."""
    waves = [(rng.uniform(0.004, 0.02), rng.uniform(0, math.tau), rng.uniform(0.3, 1.0)) for _ in range(4)]
    points = []
    for x in range(0, width + 8, 8):
        y = base - amplitude * sum(a * math.sin(f * x + p) for f, p, a in waves) / 2 - rng.uniform(0, 4)
        points.append((float(x), y))
    return points


def _scene(seed: int) -> Image.Image:
    rng = random.Random(seed)
    width, height = SAMPLE_SIZE
    horizon = int(height * 0.62)
    img = Image.new("RGB", SAMPLE_SIZE)
    draw = ImageDraw.Draw(img)
    # Sky: deep blue at the top to a warm glow at the horizon.
    for y in range(horizon):
        draw.line([(0, y), (width, y)], fill=_lerp((38, 62, 128), (250, 176, 110), (y / horizon) ** 1.6))
    # The sun with a soft halo.
    sun = (int(width * 0.68), int(horizon * 0.72))
    halo = Image.new("L", SAMPLE_SIZE, 0)
    ImageDraw.Draw(halo).ellipse([sun[0] - 70, sun[1] - 70, sun[0] + 70, sun[1] + 70], fill=150)
    img.paste((255, 220, 160), mask=halo.filter(ImageFilter.GaussianBlur(35)))
    draw.ellipse([sun[0] - 24, sun[1] - 24, sun[0] + 24, sun[1] + 24], fill=(255, 240, 200))
    # Three mountain ranges, lighter (hazier) with distance.
    for base, amplitude, colour in ((horizon - 90, 70, (122, 110, 150)), (horizon - 45, 60, (84, 80, 112)),
                                    (horizon - 5, 40, (48, 58, 70))):
        ridge = _ridge(rng, width, base, amplitude)
        draw.polygon([(0, horizon), *ridge, (width, horizon)], fill=colour)
    # Pine trees along the far shore.
    for _ in range(40):
        x = rng.uniform(0, width)
        h = rng.uniform(14, 34)
        draw.polygon([(x, horizon - h), (x - h / 4, horizon), (x + h / 4, horizon)], fill=(24, 40, 34))
    # A small house with a lit window: the subject.
    hx, hy = int(width * 0.3), horizon
    draw.rectangle([hx - 26, hy - 30, hx + 26, hy], fill=(150, 70, 50))
    draw.polygon([(hx - 32, hy - 30), (hx, hy - 52), (hx + 32, hy - 30)], fill=(70, 40, 36))
    draw.rectangle([hx - 8, hy - 22, hx + 6, hy - 10], fill=(255, 214, 120))
    # The lake: the scene above, mirrored, darkened, with ripples.
    sky_and_shore = img.crop((0, 0, width, horizon)).transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    water = sky_and_shore.crop((0, 0, width, height - horizon)).filter(ImageFilter.GaussianBlur(2))
    water = Image.blend(water, Image.new("RGB", water.size, (20, 40, 70)), 0.35)
    ripples = ImageDraw.Draw(water)
    for _ in range(160):
        y = rng.uniform(0, water.height) ** 1.0
        x = rng.uniform(0, width)
        length = rng.uniform(10, 60)
        ripples.line([(x, y), (x + length, y)], fill=(200, 190, 170) if rng.random() < 0.3 else (30, 50, 80))
    img.paste(water, (0, horizon))
    # Grain, as a camera sensor would add, then a slight softening.
    noise = Image.effect_noise(SAMPLE_SIZE, 18).convert("RGB")
    img = Image.blend(img, noise, 0.03)
    return img.filter(ImageFilter.SMOOTH)


def sample_png(seed: int = 7) -> bytes:
    """The sample picture as PNG bytes."""
    buffer = io.BytesIO()
    _scene(seed).save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def write_sample(path: Path, seed: int = 7) -> Path:
    """Write the sample picture to ``path`` (a PNG) and return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(sample_png(seed))
    return path
