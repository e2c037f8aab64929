"""Rebuild the bundled DAVIS 2016 subset in promptopt/sample_data/davis_mini.

    python scripts/make_sample_data.py ../shared/data/davis2016_val

Takes every frame the staged copy has (every 3rd frame of the original) of a
few objects, downscales images (Lanczos, JPEG q=90) and masks (nearest, PNG
0/255) so the long side is 320 px. Kept small (< 5 MB) so tests and the demo
run without ../shared.
"""
import sys
from pathlib import Path

from PIL import Image

OBJECTS = ("blackswan", "camel", "car-roundabout", "dog")
LONG_SIDE = 320

src = Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data/davis2016_val")
dst = Path(__file__).resolve().parents[1] / "promptopt" / "sample_data" / "davis_mini"
for obj in OBJECTS:
    for sub in ("images", "masks"):
        (dst / obj / sub).mkdir(parents=True, exist_ok=True)
    for img_path in sorted((src / obj / "images").glob("*.jpg")):
        mask_path = src / obj / "masks" / (img_path.stem + ".png")
        im, mk = Image.open(img_path).convert("RGB"), Image.open(mask_path).convert("L")
        scale = LONG_SIDE / max(im.size)
        size = (round(im.size[0] * scale), round(im.size[1] * scale))
        im.resize(size, Image.LANCZOS).save(dst / obj / "images" / img_path.name, quality=90)
        mk.point(lambda v: 255 if v > 127 else 0).resize(size, Image.NEAREST).save(dst / obj / "masks" / mask_path.name)
print(f"wrote {dst}")
