"""ddpm_jax against the PyTorch reference networks on this machine, alternated in one run.

An optional extra, never a CI dependency: it needs `torch` (CPU build is
enough) and, for the CIFAR-10 net, `diffusers` (`pip install torch diffusers`).
Run from the repository root:

  python -m benchmarks.vs_torch \
      --train tutorial:128 --train ddpm_cifar10:16 --steps 6
  python -m benchmarks.vs_torch --forward tutorial:1,8,32,128 --forward ddpm_cifar10:1,4,16
  python -m benchmarks.vs_torch --peak
  python -m benchmarks.vs_torch --train dit_s_2:64 --forward dit_s_2:1,16,64

* train: the library's train step (`benchmarks.run.build_train_step`: Adam
  with global-norm clipping, EMA, dropout as the preset) against a PyTorch
  eager step doing the same work: noisy images at random t, the network,
  MSE to the noise, backward, `clip_grad_norm_(1.0)`, Adam, an EMA update
  of every parameter. Also GFLOP per step (XLA's cost analysis of the JAX
  step; the two networks do the same work) and the rate each library
  reaches.
* forward: one network call at each batch size (what each step of a sampler
  costs: the samplers' scans measured within 5% of bare network calls, see
  BENCHMARKS.md); images/s of a 50-step DDIM chain = batch / (50 x call
  time).
* peak: `PEAK_KERNELS`, a square matmul and two 3x3 convolutions at the
  two nets' shapes, in float32 and in bfloat16 (JAX: float32 result), in
  GFLOP/s: the ceiling each library's kernels set for a train step.

Calls alternate JAX, PyTorch, JAX, ... after a warm-up of each, so that load
from other processes hits both alike. Each call is timed twice: wall clock
and the process's CPU time (`time.process_time`: user + system time of all
its threads, children excluded). Reported: the median of each, and the
median of the per-pair ratios PyTorch / ddpm_jax (above 1, ddpm_jax is
faster), with the load average before and after. On a shared machine the
wall-clock ratio is the target but the CPU-time ratio is the steadier
evidence: another process's work inflates the wall time of whichever call
it overlaps, not the CPU time that call itself needs. With two threads the
CPU time still grows with load (a thread waiting at a barrier for one the
kernel descheduled spins: PyTorch's OpenMP, XLA's thread pool); pinned to
one core (`taskset -c 0 python -m benchmarks.vs_torch ...`: both libraries
then run one thread) it is the work itself. `--json` also writes every
timing.

As the CLI does, the script adds `ddpm_jax.infra.cpu_flags`' XLA:CPU flags (XLA's
own convolutions instead of YNNPACK's) before JAX starts; `--peak` times the
kernels both libraries lean on. The malloc matters as much as the code. This
script restarts with glibc's huge-page malloc, as the CLI does for training,
and PyTorch then shares it.
With glibc, XLA's per-step temporaries (gigabytes) go back to the kernel
after every step and are faulted in again at the next; alternated with
PyTorch's steps, that got slow: the tutorial net's JAX step went from 3.9 s
alone to 6.2 s (on the CIFAR net the extra time was almost all system
time), and as much when each library ran in a process of its own. With tcmalloc preloaded for both
(`LD_PRELOAD=libtcmalloc_minimal.so.4 python -m benchmarks.vs_torch ...`,
Debian/Ubuntu package `libtcmalloc-minimal4`) freed blocks stay in the
process and the JAX step stayed at 3.6 s; PyTorch's was faster with it too.
Compare the two libraries under one malloc and say which (the header line
prints LD_PRELOAD and GLIBC_TUNABLES; BENCHMARKS.md has both).

The PyTorch networks: the tutorial's U-Net ("The Annotated Diffusion Model",
ConvNeXt blocks) written out below, diffusers' `UNet2DModel` with DDPM's
CIFAR-10 layer sizes, and DiT-S/2 and DiT-B/2 (unconditional, eps output, on
32x32x3) written out below as the authors' network, attention through
PyTorch's fused `scaled_dot_product_attention` as the library's goes through
`jax.nn.dot_product_attention` (diffusers' `DiTTransformer2DModel` gives each
block its own copy of the timestep embedding, more work than the paper's
network); their parameter counts are checked against the library's presets
before timing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import statistics
import sys
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp

from benchmarks import run
from ddpm_jax.engine import builders
from ddpm_jax.infra import cpu_flags, hugepages
from ddpm_jax.models import DiTConfig, count_params, dit_config
from ddpm_jax.models.dit import sincos_position_embedding

try:
  import torch
  from torch import nn
except ImportError:  # pragma: no cover - the whole script needs it
  sys.exit(
      "benchmarks/vs_torch.py needs PyTorch: pip install torch (and diffusers for ddpm_cifar10)"
  )

PARAMS = {
    "tutorial": 2_996_315,
    "ddpm_cifar10": 35_746_307,
    "dit_s_2": 32_471_436,
    "dit_b_2": 129_528_588
}
DDIM_STEPS = 50

# --- the tutorial's U-Net in PyTorch ("The Annotated Diffusion Model") -------------------------


class _Embedding(nn.Module):

  def __init__(self, dim):
    super().__init__()
    self.dim = dim

  def forward(self, t):
    half = self.dim // 2
    freqs = torch.exp(
        torch.arange(half, device=t.device) * -(math.log(10000) / (half - 1)))
    args = t[:, None].float() * freqs[None, :]
    return torch.cat([args.sin(), args.cos()], dim=-1)


class _ConvNextBlock(nn.Module):

  def __init__(self, dim, dim_out, *, time_emb_dim=None, mult=2):
    super().__init__()
    self.mlp = nn.Sequential(nn.GELU(), nn.Linear(
        time_emb_dim, dim)) if time_emb_dim else None
    self.ds_conv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
    self.net = nn.Sequential(nn.GroupNorm(1, dim),
                             nn.Conv2d(dim, dim_out * mult, 3, padding=1),
                             nn.GELU(), nn.GroupNorm(1, dim_out * mult),
                             nn.Conv2d(dim_out * mult, dim_out, 3, padding=1))
    self.res_conv = nn.Conv2d(dim, dim_out,
                              1) if dim != dim_out else nn.Identity()

  def forward(self, x, temb=None):
    h = self.ds_conv(x)
    if self.mlp is not None and temb is not None:
      h = h + self.mlp(temb)[:, :, None, None]
    return self.net(h) + self.res_conv(x)


class _Attention(nn.Module):

  def __init__(self, dim, heads=4, dim_head=32):
    super().__init__()
    self.scale, self.heads = dim_head**-0.5, heads
    self.to_qkv = nn.Conv2d(dim, dim_head * heads * 3, 1, bias=False)
    self.to_out = nn.Conv2d(dim_head * heads, dim, 1)

  def forward(self, x):
    b, _, h, w = x.shape
    q, k, v = (t.reshape(b, self.heads, -1, h * w)
               for t in self.to_qkv(x).chunk(3, dim=1))
    attn = torch.einsum("bhdi,bhdj->bhij", q * self.scale, k).softmax(dim=-1)
    out = torch.einsum("bhij,bhdj->bhid", attn, v)
    return self.to_out(out.permute(0, 1, 3, 2).reshape(b, -1, h, w))


class _LinearAttention(nn.Module):

  def __init__(self, dim, heads=4, dim_head=32):
    super().__init__()
    self.scale, self.heads = dim_head**-0.5, heads
    self.to_qkv = nn.Conv2d(dim, dim_head * heads * 3, 1, bias=False)
    self.to_out = nn.Sequential(nn.Conv2d(dim_head * heads, dim, 1),
                                nn.GroupNorm(1, dim))

  def forward(self, x):
    b, _, h, w = x.shape
    q, k, v = (t.reshape(b, self.heads, -1, h * w)
               for t in self.to_qkv(x).chunk(3, dim=1))
    q = q.softmax(dim=-2) * self.scale
    k = k.softmax(dim=-1)
    context = torch.einsum("bhdn,bhen->bhde", k, v)
    out = torch.einsum("bhde,bhdn->bhen", context, q)
    return self.to_out(out.reshape(b, -1, h, w))


class _PreNormResidual(nn.Module):

  def __init__(self, dim, fn):
    super().__init__()
    self.norm, self.fn = nn.GroupNorm(1, dim), fn

  def forward(self, x):
    return self.fn(self.norm(x)) + x


class TutorialUNet(nn.Module):
  """The Annotated Diffusion Model's `Unet(dim=28, channels=1, dim_mults=(1, 2, 4))`."""

  def __init__(self, dim=28, channels=1, dim_mults=(1, 2, 4)):
    super().__init__()
    init_dim = dim // 3 * 2
    self.init_conv = nn.Conv2d(channels, init_dim, 7, padding=3)
    dims = [init_dim, *(dim * m for m in dim_mults)]
    in_out = list(zip(dims[:-1], dims[1:]))
    time_dim = dim * 4
    self.time_mlp = nn.Sequential(_Embedding(dim), nn.Linear(dim, time_dim),
                                  nn.GELU(), nn.Linear(time_dim, time_dim))
    self.downs = nn.ModuleList([
        nn.ModuleList([
            _ConvNextBlock(d_in, d_out, time_emb_dim=time_dim),
            _ConvNextBlock(d_out, d_out, time_emb_dim=time_dim),
            _PreNormResidual(d_out, _LinearAttention(d_out)),
            nn.Conv2d(d_out, d_out, 4, 2, 1) if i < len(in_out) -
            1 else nn.Identity()
        ]) for i, (d_in, d_out) in enumerate(in_out)
    ])
    mid = dims[-1]
    self.mid_block1 = _ConvNextBlock(mid, mid, time_emb_dim=time_dim)
    self.mid_attn = _PreNormResidual(mid, _Attention(mid))
    self.mid_block2 = _ConvNextBlock(mid, mid, time_emb_dim=time_dim)
    self.ups = nn.ModuleList([
        nn.ModuleList([
            _ConvNextBlock(d_out * 2, d_in, time_emb_dim=time_dim),
            _ConvNextBlock(d_in, d_in, time_emb_dim=time_dim),
            _PreNormResidual(d_in, _LinearAttention(d_in)),
            nn.ConvTranspose2d(d_in, d_in, 4, 2, 1)
        ]) for d_in, d_out in reversed(in_out[1:])
    ])
    self.final_block = _ConvNextBlock(dim, dim)
    self.final_conv = nn.Conv2d(dim, channels, 1)

  def forward(self, x, t):
    x = self.init_conv(x)
    temb = self.time_mlp(t)
    skips = []
    for block1, block2, attn, down in self.downs:
      x = attn(block2(block1(x, temb), temb))
      skips.append(x)
      x = down(x)
    x = self.mid_block2(self.mid_attn(self.mid_block1(x, temb)), temb)
    for block1, block2, attn, up in self.ups:
      x = up(
          attn(block2(block1(torch.cat([x, skips.pop()], dim=1), temb), temb)))
    return self.final_conv(self.final_block(x))


def torch_net(preset: str) -> nn.Module:
  """The PyTorch reference network of `preset`."""
  if preset == "tutorial":
    return TutorialUNet()
  if preset.startswith("dit_"):
    h, _, c = run.IMAGE_SHAPES[preset]
    return TorchDiT(dit_config(preset, in_channels=c), image_size=h)
  from diffusers import UNet2DModel  # pylint: disable=import-outside-toplevel
  net = UNet2DModel(
      sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
      block_out_channels=(128, 256, 256, 256), norm_num_groups=32,
      norm_eps=1e-6, down_block_types=("DownBlock2D", "AttnDownBlock2D",
                                       "DownBlock2D", "DownBlock2D"),
      up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
      downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, dropout=0.1)
  return _Call(net)


class _Call(nn.Module):
  """diffusers' model called as `net(x, t)` returning the tensor."""

  def __init__(self, net):
    super().__init__()
    self.net = net

  def forward(self, x, t):
    return self.net(x, t).sample


# --- DiT in PyTorch (Peebles & Xie 2023) -------------------------------------------------------------


class _DiTBlock(nn.Module):
  """adaLN-Zero transformer block: shift, scale and gate of the attention and
  the MLP from the conditioning; attention through PyTorch's fused
  `scaled_dot_product_attention`."""

  def __init__(self, width: int, heads: int, mlp_ratio: int):
    super().__init__()
    self.heads = heads
    self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
    self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
    self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
    self.fc1 = nn.Linear(width, mlp_ratio * width)
    self.fc2 = nn.Linear(mlp_ratio * width, width)
    self.modulation = nn.Linear(width, 6 * width)
    nn.init.zeros_(self.modulation.weight)
    nn.init.zeros_(self.modulation.bias)

  def forward(self, x, c):
    shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(
        nn.functional.silu(c))[:, None].chunk(6, dim=-1)
    n, tokens, width = x.shape
    h = self.norm1(x) * (1 + scale1) + shift1
    q, k, v = self.qkv(h).view(n, tokens, 3, self.heads,
                               width // self.heads).permute(2, 0, 3, 1, 4)
    a = nn.functional.scaled_dot_product_attention(q, k, v)
    x = x + gate1 * self.proj(a.transpose(1, 2).reshape(n, tokens, width))
    h = self.norm2(x) * (1 + scale2) + shift2
    return x + gate2 * self.fc2(
        nn.functional.gelu(self.fc1(h), approximate="tanh"))


class TorchDiT(nn.Module):
  """The unconditional DiT of `ddpm_jax.models.DiT` (eps output): patch
  embedding, the fixed 2-D sin-cos positions, the sinusoidal timestep
  embedding and its MLP, adaLN-Zero blocks, the modulated final layer and
  unpatchify, NCHW in and out."""

  def __init__(self, config: DiTConfig, image_size: int):
    super().__init__()
    width, p = config.hidden_size, config.patch_size
    self.patch, self.freq_dim = p, config.time_embed_dim
    self.embed = nn.Conv2d(config.in_channels, width, p, stride=p)
    grid = image_size // p
    self.register_buffer(
        "positions",
        torch.from_numpy(sincos_position_embedding(width, grid, grid)))
    self.t_embed = nn.Sequential(nn.Linear(self.freq_dim, width), nn.SiLU(),
                                 nn.Linear(width, width))
    self.blocks = nn.ModuleList(
        _DiTBlock(width, config.num_heads, config.mlp_ratio)
        for _ in range(config.depth))
    self.final_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
    self.final_modulation = nn.Linear(width, 2 * width)
    self.final = nn.Linear(width, p * p * config.out_channels)
    for layer in (self.final_modulation, self.final):
      nn.init.zeros_(layer.weight)
      nn.init.zeros_(layer.bias)

  def forward(self, x, t):
    n, _, h, w = x.shape
    tokens = self.embed(x).flatten(2).transpose(1, 2) + self.positions
    half = self.freq_dim // 2
    angles = t[:, None].float() * torch.exp(
        -math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    c = self.t_embed(torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1))
    for block in self.blocks:
      tokens = block(tokens, c)
    shift, scale = self.final_modulation(nn.functional.silu(c))[:, None].chunk(
        2, dim=-1)
    out = self.final(self.final_norm(tokens) * (1 + scale) + shift)
    p = self.patch
    out = out.view(n, h // p, w // p, p, p, -1).permute(0, 5, 1, 3, 2, 4)
    return out.reshape(n, -1, h, w)


# --- timing ---------------------------------------------------------------------------------------


def torch_train_step(preset: str, batch: int):
  """A PyTorch eager train step doing the library step's work; returns step()."""
  net = torch_net(preset).train()
  n = sum(p.numel() for p in net.parameters())
  if n != PARAMS[preset]:
    raise SystemExit(
        f"vs_torch: the PyTorch {preset} net has {n:,} parameters, expected {PARAMS[preset]:,}"
    )
  opt = torch.optim.Adam(net.parameters(), lr=2e-4)
  ema = [p.detach().clone() for p in net.parameters()]
  h, w, c = run.IMAGE_SHAPES[preset]
  x0 = torch.rand(batch, c, h, w) * 2 - 1
  alphas_bar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0)

  def step():
    t = torch.randint(0, 1000, (batch,))
    noise = torch.randn_like(x0)
    a = alphas_bar[t][:, None, None, None]
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    loss = torch.mean((net(x_t, t) - noise)**2)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
    opt.step()
    with torch.no_grad():
      params = list(net.parameters())
      torch._foreach_mul_(ema, 0.9999)  # pylint: disable=protected-access
      torch._foreach_add_(ema, params, alpha=1e-4)  # pylint: disable=protected-access
    return loss.item()

  return step


def jax_train_step(preset: str, batch: int):
  """(step function, compile seconds, FLOPs of one step from XLA's cost analysis)."""
  compiled, state, batch_arr, rng, compile_s, _ = run.build_train_step(
      preset, batch, tiny=False)
  holder = {"state": state}

  def step():
    holder["state"], metrics = compiled(holder["state"], batch_arr, rng)
    return float(metrics["loss"])

  return step, compile_s, run.compiled_flops(compiled)


def jax_forward(preset: str, batch: int):
  model = builders.build_model(run.make_config(preset, batch, tiny=False))
  shape = (batch,) + run.IMAGE_SHAPES[preset]
  x, t = jnp.zeros(shape), jnp.full((batch,), 500, jnp.int32)
  params = jax.jit(
      lambda: model.init(jax.random.key(0), x, t, train=False))()["params"]
  if count_params(params) != PARAMS[preset]:
    raise SystemExit(
        f"vs_torch: the JAX {preset} net has {count_params(params):,} parameters"
    )
  start = time.perf_counter()
  compiled = jax.jit(
      lambda p, x, t: model.apply({"params": p}, x, t, train=False)).lower(
          params, x, t).compile()
  compile_s = time.perf_counter() - start
  return (lambda: jax.block_until_ready(compiled(params, x, t))), compile_s


def torch_forward(preset: str, batch: int):
  net = torch_net(preset).eval()
  h, w, c = run.IMAGE_SHAPES[preset]
  x, t = torch.zeros(batch, c, h, w), torch.full((batch,), 500)

  def call():
    with torch.no_grad():
      return net(x, t)

  return call


#: `--peak` kernels: name -> (JAX operand shapes, FLOPs). One square matmul, a
#: 3x3 convolution of the CIFAR net's first level at batch 16 and one of the
#: tutorial net's first level at batch 128 (NHWC / HWIO).
PEAK_KERNELS = {
    "matmul 2048^3": (((2048, 2048), (2048, 2048)), 2 * 2048**3),
    "conv3x3 16x32x32x128->128": (((16, 32, 32, 128), (3, 3, 128, 128)),
                                  2 * 16 * 32 * 32 * 128 * 128 * 9),
    "conv3x3 128x28x28x56->28": (
        ((128, 28, 28, 56), (3, 3, 56, 28)), 2 * 128 * 28 * 28 * 56 * 28 * 9),
}


def jax_kernel(name: str, dtype: str):
  """One call of a `PEAK_KERNELS` entry in JAX: inputs in `dtype`, float32 result."""
  shapes, _ = PEAK_KERNELS[name]
  a, b = (jnp.ones(shape, dtype) for shape in shapes)
  if name.startswith("matmul"):
    fn = lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32)
  else:
    fn = lambda a, b: jax.lax.conv_general_dilated(
        a, b, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
        preferred_element_type=jnp.float32)
  compiled = jax.jit(fn).lower(a, b).compile()
  return lambda: jax.block_until_ready(compiled(a, b))


def torch_kernel(name: str, dtype: str):
  """The same kernel in PyTorch (NCHW / OIHW): inputs and result in `dtype`."""
  (shape_a, shape_b), _ = PEAK_KERNELS[name]
  dt = getattr(torch, dtype)
  if name.startswith("matmul"):
    a, b = torch.ones(shape_a, dtype=dt), torch.ones(shape_b, dtype=dt)
    fn = lambda: torch.mm(a, b)
  else:
    n, h, w, c = shape_a
    kh, kw, ci, co = shape_b
    a, b = torch.ones(n, c, h, w, dtype=dt), torch.ones(co, ci, kh, kw,
                                                        dtype=dt)
    fn = lambda: torch.nn.functional.conv2d(a, b, padding=kh // 2)

  def call():
    with torch.no_grad():
      return fn()

  return call


class Timing(NamedTuple):
  """Wall-clock and process CPU seconds of one call."""
  wall_s: float
  cpu_s: float


def timed(fn) -> Timing:
  """Runs fn() once; its wall time and the process's CPU time (all threads, no children)."""
  wall, cpu = time.perf_counter(), time.process_time()
  fn()
  return Timing(time.perf_counter() - wall, time.process_time() - cpu)


def alternate(a, b, *, runs: int,
              warmup: int = 1) -> tuple[list[Timing], list[Timing]]:
  """Times a() and b() alternately, `runs` times each after `warmup` calls of each."""
  for _ in range(warmup):
    a()
    b()
  ta, tb = [], []
  for _ in range(runs):
    ta.append(timed(a))
    tb.append(timed(b))
  return ta, tb


def summary(ta: list[Timing], tb: list[Timing], load_before,
            load_after) -> dict:
  """Medians of wall and CPU time of each side and of the per-pair ratios b / a."""
  out = {"load_average_before": load_before, "load_average_after": load_after}
  for field in Timing._fields:
    a, b = [getattr(x, field) for x in ta], [getattr(x, field) for x in tb]
    out[field] = {
        "ddpm_jax": statistics.median(a),
        "torch": statistics.median(b),
        "torch_over_ddpm_jax": statistics.median(y / x for x, y in zip(a, b)),
        "runs_ddpm_jax": a,
        "runs_torch": b
    }
  return out


def _line(s: dict, scale: float, unit: str) -> str:
  w, c = s["wall_s"], s["cpu_s"]
  return (
      f"wall ddpm_jax {w['ddpm_jax'] * scale:.3f} {unit} PyTorch {w['torch'] * scale:.3f} {unit} "
      f"PyTorch/ddpm_jax x{w['torch_over_ddpm_jax']:.2f} | CPU ddpm_jax "
      f"{c['ddpm_jax'] * scale:.3f} {unit} PyTorch {c['torch'] * scale:.3f} {unit} PyTorch/ddpm_jax "
      f"x{c['torch_over_ddpm_jax']:.2f} | load {_load(s['load_average_before'])} -> "
      f"{_load(s['load_average_after'])} | wall runs {[round(v * scale, 2) for v in w['runs_ddpm_jax']]}"
      f" / {[round(v * scale, 2) for v in w['runs_torch']]}")


def _load(load) -> str:
  return "/".join(f"{v:.1f}" for v in load)


def _parse(text: str) -> tuple[str, list[int]]:
  name, _, batches = text.partition(":")
  if name not in PARAMS or not batches:
    raise argparse.ArgumentTypeError(
        f"expected PRESET:BATCH[,BATCH...] with PRESET in {sorted(PARAMS)}")
  return name, [int(b) for b in batches.split(",")]


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--train", type=_parse, action="append", default=[],
                      help="PRESET:BATCH (repeatable): train steps, alternated")
  parser.add_argument(
      "--forward", type=_parse, action="append", default=[],
      help="PRESET:BATCH[,BATCH...] (repeatable): network calls, alternated")
  parser.add_argument(
      "--peak", action="store_true",
      help="time PEAK_KERNELS (a matmul, a 3x3 conv) in float32 and bfloat16, "
      "alternated: the rate the machine's kernels reach in each library")
  parser.add_argument("--steps", type=int, default=6,
                      help="timed train steps of each")
  parser.add_argument("--calls", type=int, default=7,
                      help="timed network calls of each")
  parser.add_argument("--warmup", type=int, default=1,
                      help="untimed calls of each first")
  parser.add_argument(
      "--threads", type=int, default=None,
      help="torch.set_num_threads (default: PyTorch's own, the core count)")
  parser.add_argument("--json", default=None,
                      help="also write every timing to this JSON file")
  args = parser.parse_args(argv)
  if args.threads:
    torch.set_num_threads(args.threads)
  header = (
      f"torch {torch.__version__} ({torch.get_num_threads()} threads), jax {jax.__version__} "
      f"({jax.default_backend()}), {len(os.sched_getaffinity(0))} of {os.cpu_count()} cores, "
      f"LD_PRELOAD={os.environ.get('LD_PRELOAD', '')!r}, GLIBC_TUNABLES="
      f"{os.environ.get('GLIBC_TUNABLES', '')!r}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}"
  )
  print(header, flush=True)
  rows = []
  for preset, batches in args.train:
    for batch in batches:
      jax_step, compile_s, flops = jax_train_step(preset, batch)
      load = os.getloadavg()
      ta, tb = alternate(jax_step, torch_train_step(preset, batch),
                         runs=args.steps, warmup=args.warmup)
      s = summary(ta, tb, load, os.getloadavg())
      rate = {
          k: flops / s["wall_s"][k] / 1e9 for k in ("ddpm_jax", "torch")
      } if flops else None
      rows.append(
          dict(kind="train", preset=preset, batch=batch, compile_s=compile_s,
               gflop_per_step=flops and flops / 1e9, gflop_per_s=rate, **s))
      rates = (
          f"; {flops / 1e9:.0f} GFLOP/step, GFLOP/s ddpm_jax {rate['ddpm_jax']:.0f} "
          f"PyTorch {rate['torch']:.0f}") if flops else ""
      print(
          f"train {preset}:{batch} s/step (compile {compile_s:.1f} s{rates}): {_line(s, 1, 's')}",
          flush=True)
  for preset, batches in args.forward:
    for batch in batches:
      jax_call, compile_s = jax_forward(preset, batch)
      load = os.getloadavg()
      ta, tb = alternate(jax_call, torch_forward(preset, batch),
                         runs=args.calls, warmup=args.warmup)
      s = summary(ta, tb, load, os.getloadavg())
      ddim = {
          k: batch / (DDIM_STEPS * s["wall_s"][k]) for k in ("ddpm_jax", "torch")
      }
      rows.append(
          dict(kind="forward", preset=preset, batch=batch, compile_s=compile_s,
               ddim_images_per_s=ddim, **s))
      print(
          f"forward {preset}:{batch} ms/call (compile {compile_s:.1f} s; DDIM-{DDIM_STEPS} "
          f"images/s ddpm_jax {ddim['ddpm_jax']:.2f} PyTorch {ddim['torch']:.2f}): "
          f"{_line(s, 1e3, 'ms')}", flush=True)
  for name, (_, flops) in PEAK_KERNELS.items() if args.peak else ():
    for dtype in ("float32", "bfloat16"):
      load = os.getloadavg()
      ta, tb = alternate(jax_kernel(name, dtype), torch_kernel(name, dtype),
                         runs=args.calls, warmup=args.warmup)
      s = summary(ta, tb, load, os.getloadavg())
      rate = {k: flops / s["wall_s"][k] / 1e9 for k in ("ddpm_jax", "torch")}
      rows.append(
          dict(kind="peak", kernel=name, dtype=dtype, gflop=flops / 1e9,
               gflop_per_s=rate, **s))
      print(
          f"peak {name} {dtype} ms/call ({flops / 1e9:.1f} GFLOP; GFLOP/s JAX "
          f"{rate['ddpm_jax']:.0f} PyTorch {rate['torch']:.0f}): {_line(s, 1e3, 'ms')}",
          flush=True)
  if args.json:
    pathlib.Path(args.json).write_text(
        json.dumps(dict(header=header, rows=rows), indent=1))


if __name__ == "__main__":
  hugepages.reexec_with_huge_page_malloc()
  cpu_flags.add_to_environment()
  main()
