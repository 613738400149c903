"""Draw tokenprune/assets/sample.png, the built-in picture of `tokenprune visualize`.

A small synthetic landscape (sky gradient, sun, hills, a house, a tree) so that the first-run
demo needs no download and no image of anyone's. Run from the repository root:

    python tokenprune/assets/make_sample.py
"""
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SIZE = 224
SS = 4  # supersampling, for smooth edges


def _lerp(a, b, t):
    return tuple(int(round(x + (y - x) * t)) for x, y in zip(a, b))


def make_sample(size=SIZE):
    n = size * SS
    yy = np.linspace(0.0, 1.0, n)[:, None, None]
    top, horizon = np.array([44, 92, 168]), np.array([250, 196, 140])
    sky = (top + (horizon - top) * yy ** 0.8) * np.ones((n, n, 3))
    img = Image.fromarray(sky.astype(np.uint8))
    draw = ImageDraw.Draw(img)

    def s(*values):
        return [v * n / 224 for v in values]

    # Sun with a soft glow.
    glow = Image.new("L", (n, n), 0)
    ImageDraw.Draw(glow).ellipse(s(128, 22, 204, 98), fill=160)
    glow = glow.filter(ImageFilter.GaussianBlur(12 * SS))
    img.paste(Image.new("RGB", (n, n), (255, 236, 180)), mask=glow)
    draw.ellipse(s(146, 40, 186, 80), fill=(255, 214, 102))

    # Two rows of hills.
    x = np.arange(n)
    for base, amp, freq, phase, colour in ((140, 14, 1.3, 0.6, (92, 150, 96)),
                                           (168, 10, 2.1, 2.0, (60, 122, 72))):
        ridge = (base + amp * np.sin(x / n * freq * 2 * np.pi + phase)) * n / 224
        draw.polygon([(0, n)] + list(zip(x.tolist(), ridge.tolist())) + [(n, n)], fill=colour)

    # A house: walls, roof, door, window.
    draw.rectangle(s(40, 128, 96, 176), fill=(236, 226, 208))
    draw.polygon(s(32, 130, 68, 100, 104, 130), fill=(178, 62, 52))
    draw.rectangle(s(58, 148, 74, 176), fill=(110, 72, 50))
    draw.rectangle(s(80, 140, 92, 152), fill=(120, 180, 220))

    # A tree.
    draw.rectangle(s(150, 138, 158, 178), fill=(104, 70, 46))
    draw.ellipse(s(130, 102, 178, 146), fill=(46, 110, 58))
    draw.ellipse(s(140, 96, 170, 126), fill=(70, 140, 72))

    # A path in front.
    draw.polygon(s(60, 176, 72, 176, 120, 224, 84, 224), fill=(214, 190, 150))
    return img.resize((size, size), Image.LANCZOS)


if __name__ == "__main__":
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sample.png")
    make_sample().save(out, optimize=True)
    print(f"wrote {out}")
