"""Write the example images, video frames and parquet file that examples/data/meta_example.json uses.

    python examples/data/make_example_data.py     # rewrites images/, videos/ and example.parquet here

The files are committed; this script documents how they were made and rebuilds them (drawn with
Pillow from fixed coordinates, no randomness; the chart's letters use Pillow's default font, so
another Pillow version may draw them slightly differently). example.jsonl is written by hand.
"""

from __future__ import annotations

import io
import os

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

HERE = os.path.dirname(os.path.abspath(__file__))


def circle_image() -> Image.Image:
    """A red circle on white, 320 x 240."""
    im = Image.new("RGB", (320, 240), "white")
    ImageDraw.Draw(im).ellipse((100, 60, 220, 180), fill=(220, 30, 30), outline="black", width=3)
    return im


def squares_image() -> Image.Image:
    """Two blue squares on light grey, 400 x 200."""
    im = Image.new("RGB", (400, 200), (235, 235, 235))
    draw = ImageDraw.Draw(im)
    for x in (60, 240):
        draw.rectangle((x, 50, x + 100, 150), fill=(30, 60, 200), outline="black", width=3)
    return im


def chart_image() -> Image.Image:
    """A bar chart with bars A=3, B=7, C=5 on a wide canvas (960 x 448: several 448-pixel tiles)."""
    im = Image.new("RGB", (960, 448), "white")
    draw = ImageDraw.Draw(im)
    draw.line((80, 400, 900, 400), fill="black", width=3)  # x axis
    draw.line((80, 40, 80, 400), fill="black", width=3)  # y axis
    for k, (label, value) in enumerate((("A", 3), ("B", 7), ("C", 5))):
        x = 180 + k * 250
        draw.rectangle((x, 400 - value * 45, x + 140, 400), fill=(40, 150, 80), outline="black", width=2)
        draw.text((x + 62, 410), label, fill="black")
    return im


def ball_frames(n: int = 6) -> list[Image.Image]:
    """A black ball moving left to right over `n` frames, 160 x 96."""
    frames = []
    for k in range(n):
        im = Image.new("RGB", (160, 96), "white")
        x = 10 + k * 24
        ImageDraw.Draw(im).ellipse((x, 33, x + 30, 63), fill="black")
        frames.append(im)
    return frames


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def parquet_table() -> pa.Table:
    """HF-datasets style rows: `messages` (role + content parts) and `images` (list of {bytes, path})."""
    rows = [
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image", "text": None}, {"type": "text", "text": "What color is the circle?"}],
                },
                {"role": "assistant", "content": [{"type": "text", "text": "Red."}]},
            ],
            "images": [{"bytes": png_bytes(circle_image()), "path": "circle.png"}],
        },
        {
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "Name a primary color."}]},
                {"role": "assistant", "content": [{"type": "text", "text": "Blue."}]},
            ],
            "images": [],
        },
    ]
    return pa.Table.from_pylist(rows)


def write_all(out_dir: str = HERE) -> None:
    """(Re)write every generated file under `out_dir`."""
    images = os.path.join(out_dir, "images")
    os.makedirs(images, exist_ok=True)
    for name, im in (("circle.png", circle_image()), ("squares.png", squares_image()), ("chart.png", chart_image())):
        im.save(os.path.join(images, name))
    clip = os.path.join(out_dir, "videos", "ball")
    os.makedirs(clip, exist_ok=True)
    for k, im in enumerate(ball_frames(), 1):
        im.save(os.path.join(clip, f"frame_{k}.png"))
    pq.write_table(parquet_table(), os.path.join(out_dir, "example.parquet"))


if __name__ == "__main__":
    write_all()
    print(f"wrote images/, videos/ball/ and example.parquet under {os.path.relpath(HERE)}")
