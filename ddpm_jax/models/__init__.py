"""Noise-prediction networks: the U-Net and the DiT, their configs and presets."""

from ddpm_jax.models.config import PRESETS, UNetConfig, unet_config
from ddpm_jax.models.dit import DiT
from ddpm_jax.models.dit_config import DIT_PRESETS, DiTConfig, dit_config
from ddpm_jax.models.unet import UNet, count_params

__all__ = [
    "DIT_PRESETS", "DiT", "DiTConfig", "PRESETS", "UNet", "UNetConfig",
    "count_params", "dit_config", "unet_config"
]
