"""Sample pictures drawn by the project itself (no photos can be downloaded here)."""

from __future__ import annotations

import io
import math

from PIL import Image, ImageDraw, ImageFilter


def landscape(size=(128, 96)) -> Image.Image:
    """Sky gradient, sun, two ranges of hills and a lake."""
    width, height = size
    image = Image.new("RGB", size)
    draw = ImageDraw.Draw(image)
    for y in range(height):
        t = y / height
        draw.line([(0, y), (width, y)], fill=(int(90 + 120 * t), int(150 + 70 * t), int(235 - 40 * t)))
    draw.ellipse([width * 0.68, height * 0.1, width * 0.86, height * 0.34], fill=(255, 214, 90))
    for offset, colour in ((0.55, (70, 120, 80)), (0.68, (40, 95, 55))):
        points = [(x, height * offset + math.sin(x / width * 6.0 + offset * 9) * height * 0.08)
                  for x in range(0, width + 1, 4)]
        draw.polygon(points + [(width, height), (0, height)], fill=colour)
    draw.rectangle([0, height * 0.86, width, height], fill=(60, 110, 170))
    return image.filter(ImageFilter.GaussianBlur(0.6))


def still_life(size=(96, 96)) -> Image.Image:
    """A red teapot-like object on a plain light backdrop: good for background removal."""
    width, height = size
    image = Image.new("RGB", size, (236, 232, 224))
    draw = ImageDraw.Draw(image)
    draw.ellipse([width * 0.25, height * 0.35, width * 0.75, height * 0.85], fill=(190, 40, 40))
    draw.rectangle([width * 0.42, height * 0.25, width * 0.58, height * 0.38], fill=(160, 30, 30))
    draw.polygon([(width * 0.72, height * 0.55), (width * 0.92, height * 0.4), (width * 0.74, height * 0.68)],
                 fill=(170, 35, 35))
    draw.arc([width * 0.1, height * 0.45, width * 0.35, height * 0.72], 90, 270, fill=(150, 30, 30), width=4)
    draw.ellipse([width * 0.2, height * 0.84, width * 0.8, height * 0.92], fill=(205, 200, 190))
    return image


def street(size=(128, 96)) -> Image.Image:
    """Houses with windows under an evening sky: something to turn into a comic."""
    width, height = size
    image = Image.new("RGB", size, (250, 190, 140))
    draw = ImageDraw.Draw(image)
    colours = [(200, 90, 70), (90, 140, 190), (230, 200, 110), (120, 170, 120)]
    x = 0
    for index, colour in enumerate(colours * 2):
        house_width = width // 5
        top = height * (0.35 + 0.1 * (index % 3))
        draw.rectangle([x, top, x + house_width - 2, height], fill=colour)
        draw.polygon([(x - 2, top), (x + house_width / 2, top - height * 0.12), (x + house_width, top)],
                     fill=(110, 60, 50))
        for wy in range(int(top + 6), height - 8, 12):
            draw.rectangle([x + 5, wy, x + 10, wy + 6], fill=(255, 240, 180))
        x += house_width
    draw.rectangle([0, height * 0.9, width, height], fill=(80, 80, 90))
    return image


def badge(size=(64, 64)) -> Image.Image:
    """A round emblem on a flat background: for the remove-background,upscale chain."""
    width, height = size
    image = Image.new("RGB", size, (245, 245, 245))
    draw = ImageDraw.Draw(image)
    draw.ellipse([4, 4, width - 5, height - 5], fill=(30, 80, 160))
    draw.ellipse([width * 0.25, height * 0.25, width * 0.75, height * 0.75], fill=(250, 200, 60))
    draw.line([(width * 0.35, height * 0.5), (width * 0.65, height * 0.5)], fill=(30, 80, 160), width=3)
    return image


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
