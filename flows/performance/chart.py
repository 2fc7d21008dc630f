"""Latency by endpoint as a PNG (Pillow): one row per endpoint, a p50 bar over a p95 bar.

A picture reads better than the table when one endpoint stands out: its bar runs off where the
others stop. Pure: figures in, PNG bytes out.
"""

from __future__ import annotations

import io
import math

from PIL import Image, ImageDraw, ImageFont

from tasks.performance import EndpointStats

#: At most this many endpoints (the slowest p95 first); the table has the rest.
MAX_ROWS = 15
WIDTH = 960
LABEL_W = 300
ROW_H = 34
TOP = 56
BOTTOM = 40
P95 = (214, 69, 65)
P50 = (66, 133, 244)
GRID = (225, 225, 225)
INK = (33, 33, 33)


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the bitmap font, one size
        return ImageFont.load_default()


def _nice_max(value: float) -> float:
    """The axis' end: 1, 2 or 5 times a power of ten at or above `value`."""
    if value <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 5, 10):
        if value <= step * power:
            return float(step * power)
    return float(10 * power)


def _fit(draw: ImageDraw.ImageDraw, text: str, font: object, width: int) -> str:
    """`text` cut with an ellipsis to fit `width` pixels."""
    if draw.textlength(text, font=font) <= width:  # type: ignore[arg-type]
        return text
    while text and draw.textlength(text + "…", font=font) > width:  # type: ignore[arg-type]
        text = text[:-1]
    return text + "…"


def latency_chart(endpoints: list[EndpointStats], title: str) -> bytes:
    """The PNG: the slowest `MAX_ROWS` endpoints by p95, p50 and p95 bars on one ms axis."""
    rows = sorted(endpoints, key=lambda e: -e.p95_ms)[:MAX_ROWS]
    height = TOP + BOTTOM + ROW_H * max(1, len(rows))
    image = Image.new("RGB", (WIDTH, height), "white")
    draw = ImageDraw.Draw(image)
    font, small = _font(14), _font(11)
    draw.text((12, 10), title, fill=INK, font=_font(16))
    draw.rectangle((LABEL_W, 36, LABEL_W + 12, 46), fill=P50)
    draw.text((LABEL_W + 18, 34), "p50", fill=INK, font=small)
    draw.rectangle((LABEL_W + 60, 36, LABEL_W + 72, 46), fill=P95)
    draw.text((LABEL_W + 78, 34), "p95", fill=INK, font=small)
    plot_w = WIDTH - LABEL_W - 40
    if not rows:
        draw.text((LABEL_W, TOP + 8), "no duration=…ms lines in the logs", fill=INK, font=font)
        return _png(image)
    top_ms = _nice_max(max(e.p95_ms for e in rows))
    axis_y = TOP + ROW_H * len(rows)
    for i in range(6):
        x = LABEL_W + plot_w * i / 5
        draw.line((x, TOP - 4, x, axis_y), fill=GRID)
        tick = f"{top_ms * i / 5:g}"
        draw.text(
            (x - draw.textlength(tick, font=small) / 2, axis_y + 6), tick, fill=INK, font=small
        )
    draw.text((LABEL_W - 40, axis_y + 6), "ms", fill=INK, font=small)
    for n, e in enumerate(rows):
        y = TOP + n * ROW_H
        draw.text((12, y + 9), _fit(draw, e.endpoint, font, LABEL_W - 24), fill=INK, font=font)
        p95_w = plot_w * min(e.p95_ms, top_ms) / top_ms
        p50_w = plot_w * min(e.p50_ms, top_ms) / top_ms
        draw.rectangle((LABEL_W, y + 6, LABEL_W + max(1.0, p95_w), y + 28), fill=P95)
        draw.rectangle((LABEL_W, y + 11, LABEL_W + max(1.0, p50_w), y + 23), fill=P50)
        label = f"{e.p95_ms:.0f} ms"
        draw.text((min(LABEL_W + p95_w + 4, WIDTH - 70), y + 10), label, fill=INK, font=small)
    return _png(image)


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=True)
    return out.getvalue()
