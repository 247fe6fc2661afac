"""Published DDPM weights as ddpm_jax networks, and ddpm_jax networks as
diffusers folders.

* `diffusers`: a diffusers `UNet2DModel` folder (e.g. `google/ddpm-cifar10-32`
  downloaded with `huggingface_hub`) becomes a `UNetConfig`, a Flax parameter
  tree and the diffusion settings of `config.diffusion` (`load_diffusers`).
* `tf_checkpoint`: the DDPM authors' original TensorFlow checkpoints
  (`load_tf_checkpoint`; TensorFlow needed).
* `export`: the inverse of the diffusers reader, a ddpm_jax network and its
  diffusion settings as a `DDPMPipeline` folder that PyTorch users load
  unchanged (`to_diffusers`, `save_diffusers`).
* `dit`: a diffusers `DiTTransformer2DModel` folder as a `DiTConfig` and
  Flax parameters (`load_diffusers_dit`).
* `common`: the result types, `PretrainedError` and the assembly of a
  parameter tree from named tensors that both readers share.

Nothing is downloaded here, and torch is never required. A value the ddpm_jax
U-Net cannot express (or, exporting, diffusers cannot) raises
`PretrainedError` naming the file, the field and the value, never a silently
different network.

Example:
  >>> net = load_diffusers("ddpm-cifar10-32")  # a downloaded folder
  >>> net.config == unet_config("ddpm_cifar10", dropout=0.0)
  True
  >>> eps = UNet(config=net.config).apply({"params": net.params}, x, t,
  ...                                     train=False)
  >>> net.diffusion.var_type, net.image_size
  ('fixed_large', 32)
  >>> save_diffusers("/tmp/copy", net.config, net.params, net.diffusion,
  ...                image_size=net.image_size)
"""

from ddpm_jax.models.pretrained.common import (
    DiffusionSettings,
    Pretrained,
    PretrainedError,
    PyTree,
)
from ddpm_jax.models.pretrained.diffusers import (
    BIN_FILE,
    CONFIG_FILE,
    SAFETENSORS_FILE,
    SCHEDULER_DEFAULTS,
    SCHEDULER_FILE,
    UNET_DEFAULTS,
    diffusion_settings_from_diffusers,
    load_diffusers,
    params_from_diffusers,
    read_tensors,
    unet_config_from_diffusers,
)
from ddpm_jax.models.pretrained.dit import (
    PretrainedDiT,
    dit_config_from_diffusers,
    dit_params_from_diffusers,
    load_diffusers_dit,
)
from ddpm_jax.models.pretrained.export import (
    DIFFUSERS_VERSION,
    MODEL_CARD_FILE,
    MODEL_INDEX_FILE,
    model_index,
    pipeline_files,
    save_diffusers,
    scheduler_config_to_diffusers,
    to_diffusers,
    unet_config_to_diffusers,
)
from ddpm_jax.models.pretrained.tf_checkpoint import (
    TF_EMA_SUFFIX,
    load_tf_checkpoint,
)

__all__ = [
    "BIN_FILE",
    "CONFIG_FILE",
    "DIFFUSERS_VERSION",
    "DiffusionSettings",
    "MODEL_CARD_FILE",
    "MODEL_INDEX_FILE",
    "Pretrained",
    "PretrainedDiT",
    "PretrainedError",
    "PyTree",
    "SAFETENSORS_FILE",
    "SCHEDULER_DEFAULTS",
    "SCHEDULER_FILE",
    "TF_EMA_SUFFIX",
    "UNET_DEFAULTS",
    "diffusion_settings_from_diffusers",
    "dit_config_from_diffusers",
    "dit_params_from_diffusers",
    "load_diffusers",
    "load_diffusers_dit",
    "load_tf_checkpoint",
    "model_index",
    "params_from_diffusers",
    "pipeline_files",
    "read_tensors",
    "save_diffusers",
    "scheduler_config_to_diffusers",
    "to_diffusers",
    "unet_config_to_diffusers",
    "unet_config_from_diffusers",
]
