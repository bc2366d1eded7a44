"""Pillow's resampling of synthetic images, for crates/fqvit-calib/tests/preprocess.rs.

Run once by `cargo xtask pillow-fixtures` (it installs Pillow from PyPI into a scratch folder).
The images are made from formulas that the Rust test repeats; no ImageNet pixels are involved.
Output: tests/fixtures/pillow_resize.bin, a sequence of records
  u32 pattern, u32 w, u32 h, u32 out_w, u32 out_h, then out_w*out_h*3 bytes (RGB), little-endian.
"""
import struct, sys
import PIL
from PIL import Image

# (pattern, w, h, out_w, out_h): up- and down-scaling, odd sizes, extreme aspect ratios.
CASES = [
    (0, 114, 114, 124, 124), (1, 114, 114, 124, 124), (2, 114, 114, 124, 124),
    (2, 227, 227, 248, 248),
    (0, 500, 375, 93, 70), (1, 500, 375, 93, 70), (2, 500, 375, 93, 70),
    (0, 97, 301, 64, 199), (1, 97, 301, 64, 199), (2, 97, 301, 64, 199),
    (0, 320, 685, 62, 132), (2, 320, 685, 62, 132), (1, 31, 400, 17, 219),
    (2, 640, 480, 101, 77), (0, 13, 17, 59, 41), (1, 256, 256, 256, 40),
]

def pixel(pattern, x, y, c, state):
    if pattern == 0:  # smooth gradient
        return (x * 3 + y * 5 + c * 70) % 256
    if pattern == 1:  # sharp edges: 8-pixel checkerboard, per-channel phase
        return 255 if ((x // 8 + y // 8 + c) % 2) else 0
    return state  # noise

def make(pattern, w, h):
    data = bytearray(w * h * 3)
    state = 12345
    for y in range(h):
        for x in range(w):
            for c in range(3):
                state = (state * 1103515245 + 12345) & 0xFFFFFFFF
                data[(y * w + x) * 3 + c] = pixel(pattern, x, y, c, (state >> 16) & 255)
    return Image.frombytes("RGB", (w, h), bytes(data))

out = open(sys.argv[1], "wb")
for pattern, w, h, ow, oh in CASES:
    r = make(pattern, w, h).resize((ow, oh), Image.BICUBIC)
    out.write(struct.pack("<5I", pattern, w, h, ow, oh))
    out.write(r.tobytes())
print("Pillow", PIL.__version__, "wrote", len(CASES), "cases to", sys.argv[1])
