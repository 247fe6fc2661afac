"""The CPU convolution with an im2col kernel gradient equals XLA's convolution."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax.models import UNet, layers, unet_config


def _lax(x, k, padding):
  return jax.lax.conv_general_dilated(x, k, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize("shape,kernel,padding", [
    ((2, 8, 8, 5), (3, 3, 5, 7), "SAME"),
    ((3, 6, 10, 4), (3, 3, 4, 4), ((1, 1), (1, 1))),
    ((2, 9, 9, 1), (7, 7, 1, 6), "SAME"),
])
def test_im2col_conv_matches_lax_forward_and_gradient(shape, kernel, padding):
  x = jax.random.normal(jax.random.key(0), shape)
  k = jax.random.normal(jax.random.key(1), kernel)
  fast = layers.conv_general_dilated("im2col")
  dn = jax.lax.conv_dimension_numbers(x.shape, k.shape, ("NHWC", "HWIO", "NHWC"))
  f = lambda x, k: fast(x, k, (1, 1), padding, dimension_numbers=dn)
  np.testing.assert_array_equal(f(x, k), _lax(x, k, padding))
  loss = lambda conv: lambda x, k: jnp.sum(jnp.sin(conv(x, k)))
  got = jax.grad(loss(f), (0, 1))(x, k)
  want = jax.grad(loss(lambda x, k: _lax(x, k, padding)), (0, 1))(x, k)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(w))))


def test_ineligible_calls_fall_through_to_lax():
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  k = jax.random.normal(jax.random.key(1), (4, 4, 3, 5))
  fast = layers.conv_general_dilated("im2col")
  dn = ("NHWC", "HWIO", "NHWC")
  got = fast(x, k, (2, 2), ((1, 1), (1, 1)), dimension_numbers=dn)
  want = jax.lax.conv_general_dilated(x, k, (2, 2), ((1, 1), (1, 1)), dimension_numbers=dn)
  np.testing.assert_array_equal(got, want)
  with pytest.raises(ValueError, match="conv method"):
    layers.conv_general_dilated("fast")


@pytest.mark.slow  # ~20-40 s of CPU each: the U-Net and its gradients run eagerly
@pytest.mark.parametrize("preset,shape,overrides", [
    ("tutorial", (2, 8, 8, 1), dict(base_channels=8, channel_mults=(1, 2), num_groups=4,
                                    attention=("none", "linear"))),
    ("ddpm_cifar10", (2, 8, 8, 3), dict(base_channels=8, channel_mults=(1, 2), num_groups=4,
                                        attention=("none", "full"), dropout=0.0)),
])
def test_unet_same_params_outputs_and_gradients(preset, shape, overrides):
  x = jax.random.normal(jax.random.key(0), shape)
  t = jnp.array([3, 17])
  nets = {m: UNet(config=unet_config(preset, conv_method=m, **overrides)) for m in ("lax", "im2col")}
  params = nets["lax"].init(jax.random.key(1), x, t, train=False)["params"]
  params_fast = nets["im2col"].init(jax.random.key(1), x, t, train=False)["params"]
  assert jax.tree.structure(params) == jax.tree.structure(params_fast)
  jax.tree.map(np.testing.assert_array_equal, params, params_fast)
  # Perturb so that the near-zero-initialized convs matter.
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(2), len(leaves))
  params = jax.tree.unflatten(tree, [p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])

  def loss(net):
    return lambda p: jnp.mean(net.apply({"params": p}, x, t, train=False) ** 2)

  np.testing.assert_allclose(nets["im2col"].apply({"params": params}, x, t, train=False),
                             nets["lax"].apply({"params": params}, x, t, train=False), rtol=1e-5, atol=1e-5)
  got = jax.grad(loss(nets["im2col"]))(params)
  want = jax.grad(loss(nets["lax"]))(params)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=2e-4, atol=2e-5 * float(jnp.max(jnp.abs(w)))),
               got, want)


def test_auto_is_im2col_on_cpu_only():
  assert layers._resolve_conv_method("auto") == ("im2col" if jax.default_backend() == "cpu" else "lax")
