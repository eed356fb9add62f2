"""Drawing one `SynthWorld` creature: a 64x64 picture under a random pose, background and noise.

A creature is a shape filled with one colour, or two (a two-tone creature: split in halves along its
axis, which half gets which colour drawn at random), with a dark pattern on top.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageChops, ImageDraw

COLOURS = {
    "red": (220, 40, 40), "orange": (245, 140, 30), "yellow": (240, 220, 40), "green": (50, 180, 60),
    "cyan": (40, 200, 210), "blue": (40, 80, 220), "purple": (150, 60, 200), "pink": (245, 120, 190),
}


def _unit_polygon(shape: str) -> list[tuple[float, float]]:
    if shape == "square":
        return [(-.78, -.78), (.78, -.78), (.78, .78), (-.78, .78)]
    if shape == "triangle":
        return [(math.cos(a), math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "star":
        return [((1 if k % 2 == 0 else .42) * math.cos(-math.pi / 2 + k * math.pi / 5),
                 (1 if k % 2 == 0 else .42) * math.sin(-math.pi / 2 + k * math.pi / 5)) for k in range(10)]
    if shape == "cross":
        a, b = .3, 1.0
        return [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a), (-b, -a),
                (-a, -a)]
    if shape == "diamond":
        return [(0, -1), (.55, 0), (0, 1), (-.55, 0)]
    if shape == "arrow":
        return [(-1, -.22), (.15, -.22), (.15, -.6), (1, 0), (.15, .6), (.15, .22), (-1, .22)]
    raise ValueError(shape)


def _jitter(rng: np.random.Generator, colour: str) -> tuple[int, ...]:
    return tuple(int(v) for v in np.clip(np.array(COLOURS[colour]) + rng.uniform(-15, 15, 3), 0, 255))


def draw_creature(shape: str, colours: tuple[str, ...], pattern: str, key: list[int]) -> Image.Image:
    """A 64x64 RGB picture; `key` seeds the pose, background and noise (a one-colour creature draws exactly
    what version 1 of the world drew; the second colour of a two-tone one comes from a side stream)."""
    rng = np.random.default_rng(key)
    S = 128  # drawn at 2x, reduced to 64 for anti-aliasing
    r = S / 2 * rng.uniform(0.6, 0.9)  # object scale: radius 0.6-0.9 of half the picture, fully inside
    cx, cy = (rng.uniform(r * 1.1, S - r * 1.1) for _ in range(2))
    theta = rng.uniform(0, 2 * math.pi)
    mask = Image.new("L", (S, S), 0)
    draw = ImageDraw.Draw(mask)
    rc = r * .9
    if shape in ("circle", "crescent"):
        draw.ellipse((cx - rc, cy - rc, cx + rc, cy + rc), fill=255)
        if shape == "crescent":
            ox, oy, ri = cx + .5 * r * math.cos(theta), cy + .5 * r * math.sin(theta), r * .75
            draw.ellipse((ox - ri, oy - ri, ox + ri, oy + ri), fill=0)
    else:
        c, s = math.cos(theta), math.sin(theta)
        points = [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in _unit_polygon(shape)]
        draw.polygon(points, fill=255)
    pat = Image.new("L", (S, S), 0)
    pdraw = ImageDraw.Draw(pat)
    if pattern == "stripes":  # bands across the shape, turned with it
        a, period = theta + math.pi / 4, r * .45
        u, v = (math.cos(a), math.sin(a)), (-math.sin(a), math.cos(a))
        for k in range(-6, 7):
            o0, o1 = k * period, k * period + period * .35
            pdraw.polygon([(cx + u[0] * o + v[0] * t, cy + u[1] * o + v[1] * t)
                           for o, t in ((o0, -2 * r), (o1, -2 * r), (o1, 2 * r), (o0, 2 * r))], fill=255)
    elif pattern == "dots":  # a grid of dots, turned with the shape
        p, rd = r * .5, r * .5 * .24
        c, s = math.cos(theta), math.sin(theta)
        for i in range(-4, 5):
            for j in range(-4, 5):
                x, y = cx + p * (i + .5) * c - p * (j + .5) * s, cy + p * (i + .5) * s + p * (j + .5) * c
                pdraw.ellipse((x - rd, y - rd, x + rd, y + rd), fill=255)
    elif pattern == "ring":  # a dark border along the outline
        w = max(2, int(r * .14))
        if shape in ("circle", "crescent"):
            pdraw.ellipse((cx - rc, cy - rc, cx + rc, cy + rc), outline=255, width=w)
            if shape == "crescent":
                pdraw.ellipse((ox - ri - w, oy - ri - w, ox + ri + w, oy + ri + w), outline=255, width=w)
        else:
            pdraw.polygon(points, outline=255, width=w)
    pat = ImageChops.multiply(pat, mask)
    # background: a gradient between two muted colours in a random direction
    c0, c1 = (rng.uniform(70, 190) + rng.uniform(-25, 25, 3) for _ in range(2))
    a = rng.uniform(0, 2 * math.pi)
    g = np.linspace(-1, 1, 8, dtype=np.float32)
    t = ((g[None, :] * math.cos(a) + g[:, None] * math.sin(a)) * .35 + .5)[..., None]
    bg = Image.fromarray((c0 * (1 - t) + c1 * t).clip(0, 255).astype(np.uint8), "RGB").resize((S, S),
                                                                                               Image.BILINEAR)
    fill = [_jitter(rng, colours[0])]
    dark = (int(25 + rng.uniform(0, 15)),) * 3
    if len(colours) == 2:
        side = np.random.default_rng([*key, 2])
        fill.append(_jitter(side, colours[1]))
        if side.random() < .5:
            fill.reverse()
    img = Image.composite(Image.new("RGB", (S, S), fill[0]), bg, mask)
    if len(colours) == 2:  # the second colour fills the half on one side of the axis (through the centre, along theta)
        u, n = (2 * S * math.cos(theta), 2 * S * math.sin(theta)), (-2 * S * math.sin(theta), 2 * S * math.cos(theta))
        half = Image.new("L", (S, S), 0)
        ImageDraw.Draw(half).polygon([(cx - u[0], cy - u[1]), (cx + u[0], cy + u[1]),
                                      (cx + u[0] + n[0], cy + u[1] + n[1]), (cx - u[0] + n[0], cy - u[1] + n[1])],
                                     fill=255)
        img = Image.composite(Image.new("RGB", (S, S), fill[1]), img, ImageChops.multiply(half, mask))
    img = Image.composite(Image.new("RGB", (S, S), dark), img, pat).reduce(2)
    img = np.asarray(img, dtype=np.float32) + rng.normal(0, 6, (64, 64, 3)).astype(np.float32)
    return Image.fromarray(img.clip(0, 255).astype(np.uint8), "RGB")
