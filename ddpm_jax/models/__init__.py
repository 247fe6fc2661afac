"""Noise-prediction networks: the U-Net, its config and presets."""

from ddpm_jax.models.config import PRESETS, UNetConfig, unet_config
from ddpm_jax.models.unet import UNet, count_params

__all__ = ["PRESETS", "UNet", "UNetConfig", "count_params", "unet_config"]
