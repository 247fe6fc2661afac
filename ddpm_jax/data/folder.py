"""Image folders, or .tar / .tar.gz archives of one, decoded into memory.

Layout rule, applied to the directory tree (or the archive's member paths);
files and folders whose name starts with '.' are ignored:

1. Starting at the top, if a folder named like the split (e.g. 'train') is
   present, it becomes the split root. Otherwise a level holding exactly one
   folder and no files (e.g. an archive's 'cifar10/') is descended into and
   the search repeats.
2. If no split folder exists, the whole tree is the 'train' split; any other
   split is an error.
3. If the split root has subfolders, each is a class: sorted names get ids
   0, 1, ...; files below a class folder (at any depth) get its id. Otherwise
   the images are unlabelled (label 0, one class).

So `folder:cifar10_jpg.tar.gz` with split 'test' reads `cifar10/test/<class>/`.

Every selected file must decode (Pillow) to an image: with
`skip_bad_files=False` the first one that does not is an error naming it, with
`skip_bad_files=True` such files (and loose files beside class folders) are
skipped with one logged warning. Images are converted to RGB (channels 3 or
None) or greyscale (channels 1), decoded once in parallel threads and kept
as uint8.
"""

from __future__ import annotations

import collections
import concurrent.futures
import io
import tarfile
from typing import Callable

import numpy as np
from absl import logging
from etils import epath
from PIL import Image

from ddpm_jax.data import common
from ddpm_jax.infra import storage

_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_CHUNK = 256  # files decoded per thread task


def _is_hidden(relpath: str) -> bool:
  return any(part.startswith(".") for part in relpath.split("/"))


def _list_directory(root: epath.Path) -> dict[str, Callable[[], bytes]]:
  """Maps the relative posix path of every visible file to a reader."""
  files = {}
  for directory, dirnames, filenames in storage.walk(root):
    dirnames[:] = [d for d in dirnames if not d.startswith(".")]
    for name in filenames:
      path = directory / name
      relpath = path.relative_to(root).as_posix()
      if not _is_hidden(relpath):
        files[relpath] = path.read_bytes
  return files


def _list_tar(path: epath.Path) -> dict[str, Callable[[], bytes]]:
  """Reads every visible regular file of an archive in one streaming pass."""
  files = {}
  try:
    with path.open("rb") as f, tarfile.open(fileobj=f, mode="r|*") as archive:
      for member in archive:
        name = member.name.removeprefix("./")
        if member.isfile() and not _is_hidden(name):
          data = archive.extractfile(member).read()
          files[name] = lambda data=data: data
  except (OSError, tarfile.TarError, EOFError) as e:
    raise common.DataError(f"folder:{path}: cannot read archive ({e})") from e
  return files


def _split_root(relpaths: list[str], split: str, where: str) -> str:
  """Returns the folder prefix ('' or 'a/b/') holding the split (rule 1-2)."""
  prefix = ""
  while True:
    below = [p[len(prefix):] for p in relpaths if p.startswith(prefix)]
    folders = {p.split("/")[0] for p in below if "/" in p}
    has_files = any("/" not in p for p in below)
    if split in folders:
      return f"{prefix}{split}/"
    if len(folders) == 1 and not has_files:
      prefix += f"{folders.pop()}/"
      continue
    if split == "train":
      return prefix
    raise common.DataError(
        f"{where}: no {split!r} folder (looked in '{prefix or '.'}', which "
        f"holds folders {sorted(folders)}); without split folders the whole "
        f"tree is the 'train' split")


def _decode(name: str, read: Callable[[], bytes], *, image_size: int | None,
            channels: int | None, resize: bool) -> np.ndarray | str:
  """Decodes one file to uint8 [H, W, C], or returns why it cannot."""
  try:
    with Image.open(io.BytesIO(read())) as image:
      image = image.convert("L" if channels == 1 else "RGB")
  except Image.UnidentifiedImageError:
    return "not an image Pillow can read"
  except Exception as e:  # pylint: disable=broad-except
    # Any failure to read or decode means the file is bad; the caller reports
    # it with the file name.
    return f"{type(e).__name__}: {e}"
  pixels = np.asarray(
      common.fit_image(image, image_size=image_size, resize=resize))
  return pixels.reshape(pixels.shape[0], pixels.shape[1], -1)


def load_folder(path: epath.Path, *, split: str, image_size: int | None,
                channels: int | None, resize: bool, num_classes: int | None,
                skip_bad_files: bool) -> common.ImageArrays:
  """Loads one split of an image folder or archive (see the module rules).

  Args:
    path: A directory, or a .tar / .tar.gz / .tgz file (local or gs://).
    split: Split name, e.g. 'train'.
    image_size: Configured side length, or None to require equal sizes.
    channels: 1 for greyscale, 3 or None for RGB.
    resize: Center-crop and resize to `image_size` instead of requiring it.
    num_classes: Configured class count, or None for the class folders.
    skip_bad_files: Skip undecodable files with a warning instead of failing.

  Returns:
    The split, uint8 images [N, S, S, C] and int32 labels [N], in sorted
    path order.

  Raises:
    DataError: naming the path, or the first bad file or mismatching image.
  """
  where = f"folder:{path}"
  if path.is_dir():
    files = _list_directory(path)
  elif path.is_file() and path.name.endswith(_TAR_SUFFIXES):
    files = _list_tar(path)
  elif path.exists():
    raise common.DataError(f"{where}: not a directory or a "
                           f"{'/'.join(_TAR_SUFFIXES)} archive")
  else:
    raise common.DataError(f"{where}: no such directory or archive")
  if not files:
    raise common.DataError(f"{where}: contains no files")

  root = _split_root(sorted(files), split, where)
  relpaths = sorted(p[len(root):] for p in files if p.startswith(root))
  classes = sorted({p.split("/")[0] for p in relpaths if "/" in p})
  bad = collections.OrderedDict()
  if classes:
    for loose in (p for p in relpaths if "/" not in p):
      bad[root + loose] = "not inside a class folder"
    relpaths = [p for p in relpaths if "/" in p]
  class_ids = {name: i for i, name in enumerate(classes)}
  labels = [class_ids[p.split("/")[0]] if classes else 0 for p in relpaths]

  def decode_chunk(chunk: list[str]) -> list[np.ndarray | str]:
    return [
        _decode(root + p, files[root + p], image_size=image_size,
                channels=channels, resize=resize) for p in chunk
    ]

  chunks = [relpaths[i:i + _CHUNK] for i in range(0, len(relpaths), _CHUNK)]
  with concurrent.futures.ThreadPoolExecutor() as pool:
    decoded = [x for chunk in pool.map(decode_chunk, chunks) for x in chunk]

  images, kept_labels = [], []
  for relpath, label, result in zip(relpaths, labels, decoded):
    if isinstance(result, str):
      bad[root + relpath] = result
    else:
      images.append(result)
      kept_labels.append(label)
  if bad:
    first, reason = next(iter(bad.items()))
    if not skip_bad_files:
      raise common.DataError(
          f"{where}: cannot use file '{first}' ({reason}); {len(bad)} bad "
          f"file(s) in all. Pass skip_bad_files=True to skip them")
    logging.warning("%s: skipped %d bad file(s), e.g. '%s' (%s)", where,
                    len(bad), first, reason)
  if not images:
    raise common.DataError(f"{where}: no images in split {split!r}")

  height, width, _ = images[0].shape
  expected = (image_size, image_size) if image_size else (height, width)
  for relpath, image in zip(
      (p for p, r in zip(relpaths, decoded) if not isinstance(r, str)), images):
    if image.shape[:2] != expected:
      raise common.DataError(
          f"{where}: '{root + relpath}' is {image.shape[0]}x{image.shape[1]} "
          f"but expected {expected[0]}x{expected[1]} "
          f"({'image_size' if image_size else 'the size of the first image'})"
          f"; pass image_size and resize=True to resize")
  num_classes = common.check_num_classes(max(len(classes), 1), num_classes,
                                         where)
  return common.ImageArrays(np.stack(images), np.asarray(kept_labels, np.int32),
                            num_classes)
