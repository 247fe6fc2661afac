"""The per-backend code of `models.kernels` equals XLA's and flax's, in value and gradient."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax.models import UNet, kernels, layers, unet_config

NHWC = ("NHWC", "HWIO", "NHWC")
ON_CPU = jax.default_backend() == "cpu"


def _normal(seed, shape):
  """Random float32 data from NumPy (no JAX compile per shape)."""
  return jnp.asarray(
      np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _conv(x, k, padding, groups=1, stride=(1, 1)):
  return kernels.conv_general_dilated(x, k, stride, padding,
                                      dimension_numbers=NHWC,
                                      feature_group_count=groups)


def _value_and_grads(x, k, padding, groups, cotangent):
  """Output and both gradients of the drop-in under `auto` and under `xla`."""

  @jax.jit
  def value_and_grads(x, k, cotangent):
    out, vjp = jax.vjp(lambda x, k: _conv(x, k, padding, groups), x, k)
    return (out, *vjp(cotangent))

  results = []
  for name in ("auto", "xla"):
    with kernels.implementation(name):
      results.append(value_and_grads(x, k, cotangent))
  return results


def _assert_grads_close(got, want):
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5,
                               atol=1e-5 * float(jnp.max(jnp.abs(w))))


@pytest.mark.parametrize("shape,kernel,padding", [
    ((2, 8, 8, 5), (3, 3, 5, 7), "SAME"),
    ((3, 6, 10, 4), (3, 3, 4, 4), ((1, 1), (1, 1))),
    ((2, 9, 9, 1), (7, 7, 1, 6), "SAME"),
])
def test_dense_conv_forward_is_bit_identical_and_gradients_match(
    shape, kernel, padding):
  x, k, g = _normal(0, shape), _normal(1,
                                       kernel), _normal(2,
                                                        shape[:3] + kernel[-1:])
  (out, *grads), (ref, *ref_grads) = _value_and_grads(x, k, padding, 1, g)
  np.testing.assert_array_equal(out, ref)
  _assert_grads_close(grads, ref_grads)


@pytest.mark.parametrize("kernel_size", [3, 7])
def test_depthwise_conv_matches_grouped_xla_conv(kernel_size):
  x, k, g = _normal(0, (2, 9, 11, 5)), _normal(
      1, (kernel_size, kernel_size, 1, 5)), _normal(2, (2, 9, 11, 5))
  (out, *grads), (ref, *ref_grads) = _value_and_grads(x, k, "SAME", 5, g)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  _assert_grads_close(grads, ref_grads)


@pytest.mark.parametrize(
    "kernel,padding,groups,stride",
    [
        ((4, 4, 3, 6), ((1, 1), (1, 1)), 1, (2, 2)),  # stride 2
        ((3, 3, 3, 6), ((0, 1), (0, 1)), 1, (2, 2)),  # DDPM's down conv
        ((2, 2, 3, 6), "SAME", 1, (1, 1)),  # even kernel
        ((3, 3, 3, 6), "VALID", 1, (1, 1)),
        ((3, 3, 1, 6), "SAME", 3,
         (1, 1)),  # depthwise with channel multiplier 2
    ])
def test_other_convolutions_are_xla_itself(kernel, padding, groups, stride):
  x, k = _normal(0, (2, 8, 8, 3)), _normal(1, kernel)
  conv = lambda x, k: _conv(x, k, padding, groups, stride)
  jaxpr = jax.make_jaxpr(conv)(x, k)
  assert [e.primitive.name for e in jaxpr.jaxpr.eqns
         ] == ["conv_general_dilated"]
  want = jax.lax.conv_general_dilated(x, k, stride, padding,
                                      dimension_numbers=NHWC,
                                      feature_group_count=groups)
  np.testing.assert_array_equal(conv(x, k), want)


def test_auto_uses_the_cpu_kernels_on_cpu_only_and_xla_never():
  x, k = jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 2))
  conv = jax.jit(lambda x, k: _conv(x, k, "SAME"))

  def primitives():
    return [
        e.primitive.name
        for e in jax.make_jaxpr(conv)(x, k).jaxpr.eqns[0].params["jaxpr"].eqns
    ]

  assert primitives() == (["custom_vjp_call"]
                          if ON_CPU else ["conv_general_dilated"])
  with kernels.implementation(
      "xla"):  # the same jitted function is traced again
    assert primitives() == ["conv_general_dilated"]
  assert primitives() == (["custom_vjp_call"]
                          if ON_CPU else ["conv_general_dilated"])


def test_unknown_implementation_raises_value_error():
  with pytest.raises(ValueError, match="must be one of"):
    kernels.implementation("im2col")


def _closed_form_attention(q, k, v):
  """softmax(q k^T / sqrt(d)) v per head, in float32."""
  q, k, v = (a.astype(jnp.float32) for a in (q, k, v))
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)


# (heads, head width): the DDPM net's single 256-wide head and the tutorial's 4 heads of 32.
@pytest.mark.parametrize("heads,head_dim", [(1, 256), (4, 32)])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-5),
                                       (jnp.bfloat16, 3e-2)])
def test_attention_matches_the_closed_form(heads, head_dim, dtype, tol):
  q, k, v, g = (_normal(i, (2, 64, heads, head_dim)) for i in range(4))
  want, want_vjp = jax.vjp(_closed_form_attention, q, k, v)
  want_grads = want_vjp(g)

  @jax.jit
  def value_and_grads(q, k, v, g):
    out, vjp = jax.vjp(kernels.dot_product_attention, q, k, v)
    return (out, *vjp(g.astype(dtype)))

  for name in ("auto",
               "xla"):  # on GPU, 'auto' in bfloat16 is cuDNN's flash attention
    with kernels.implementation(name):
      out, *grads = value_and_grads(*(a.astype(dtype) for a in (q, k, v)), g)
    assert out.dtype == dtype
    for got, ref in zip((out, *grads), (want, *want_grads)):
      np.testing.assert_allclose(np.asarray(got, np.float32), ref, rtol=tol,
                                 atol=tol * float(jnp.max(jnp.abs(ref))))


# --- GroupNorm (+ activation) -----------------------------------------------------------------

GELU = functools.partial(nn.gelu, approximate=False)


def _flax_group_norm(params, x, *, num_groups, epsilon, activation, dtype):
  """The reference: `activation(nn.GroupNorm(...)(x))`, differentiated by JAX."""
  y = nn.GroupNorm(num_groups=num_groups, epsilon=epsilon,
                   dtype=dtype).apply(params, x)
  return y if activation is None else activation(y)


@pytest.mark.parametrize(
    "shape,num_groups,epsilon,activation",
    [
        ((2, 6, 5, 8), 4, 1e-6, nn.swish),  # DDPM's ResnetBlock: norm -> swish
        ((3, 4, 4, 6), 3, 1e-5, None),  # the attention's pre-norm
        ((2, 5, 7, 12), 1, 1e-5, nn.silu),  # one group
        ((2, 3, 3, 4), 4, 1e-3, GELU),  # one channel per group, exact GELU
        ((4, 10, 6), 2, 1e-6, nn.swish),  # [B, T, C]
    ])
def test_group_norm_matches_flax_in_value_and_gradients(shape, num_groups,
                                                        epsilon, activation):
  # Offset and scaled input (the fast variance E[x^2] - E[x]^2 must hold up), random scale and bias.
  x = 3.0 * _normal(0, shape) + 2.0
  scale, bias, g = 1.0 + 0.5 * _normal(1, shape[-1:]), _normal(
      2, shape[-1:]), _normal(3, shape)
  reference = functools.partial(_flax_group_norm, num_groups=num_groups,
                                epsilon=epsilon, activation=activation,
                                dtype=jnp.float32)
  want, vjp = jax.vjp(
      lambda x, s, b: reference({"params": {
          "scale": s,
          "bias": b
      }}, x), x, scale, bias)
  want_grads = vjp(g)

  @jax.jit
  def value_and_grads(x, scale, bias, g):
    norm = functools.partial(kernels.group_norm, num_groups=num_groups,
                             epsilon=epsilon, activation=activation)
    out, vjp = jax.vjp(norm, x, scale, bias)
    return (out, *vjp(g))

  for name in ("auto", "xla"):
    with kernels.implementation(name):
      out, *grads = value_and_grads(x, scale, bias, g)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    _assert_grads_close(grads, want_grads)


@pytest.mark.parametrize("activation", [None, nn.swish])
def test_group_norm_in_bfloat16_matches_flax(activation):
  x = (3.0 * _normal(0, (2, 4, 4, 8)) + 2.0).astype(jnp.bfloat16)
  scale, bias, g = 1.0 + 0.5 * _normal(1, (8,)), _normal(2, (8,)), _normal(
      3, (2, 4, 4, 8))
  want, vjp = jax.vjp(
      lambda x, s, b: _flax_group_norm({"params": {
          "scale": s,
          "bias": b
      }}, x, num_groups=2, epsilon=1e-6, activation=activation, dtype=jnp.
                                       bfloat16), x, scale, bias)
  want_grads = vjp(g.astype(jnp.bfloat16))

  @jax.jit
  def value_and_grads(x, scale, bias, g):
    norm = functools.partial(kernels.group_norm, num_groups=2, epsilon=1e-6,
                             activation=activation, dtype=jnp.bfloat16)
    out, vjp = jax.vjp(norm, x, scale, bias)
    return (out, *vjp(g))

  for name in ("auto", "xla"):
    with kernels.implementation(name):
      out, *grads = value_and_grads(x, scale, bias, g.astype(jnp.bfloat16))
    assert out.dtype == jnp.bfloat16
    assert [a.dtype for a in grads] == [jnp.bfloat16, jnp.float32, jnp.float32]
    for got, ref in zip((out, *grads), (want, *want_grads)):
      np.testing.assert_allclose(
          np.asarray(got, np.float32), np.asarray(ref, np.float32), rtol=2e-2,
          atol=2e-2 * float(jnp.max(jnp.abs(ref.astype(jnp.float32)))))


def test_group_norm_layer_has_flax_parameters():
  x = _normal(0, (2, 4, 4, 6))
  ours = layers.GroupNorm(3, 1e-6, nn.swish).init(jax.random.key(0), x)
  want = nn.GroupNorm(num_groups=3, epsilon=1e-6).init(jax.random.key(0), x)
  assert jax.tree.structure(ours) == jax.tree.structure(want)
  jax.tree.map(np.testing.assert_array_equal, ours, want)


@pytest.mark.parametrize("num_groups,scale_shape,message", [
    (4, (6,), "num_groups=4 must divide the 6 channels"),
    (0, (6,), "num_groups=0 must divide"),
    (3, (5,), "scale and bias must be"),
])
def test_group_norm_bad_arguments_raise_value_error(num_groups, scale_shape,
                                                    message):
  with pytest.raises(ValueError, match=message):
    kernels.group_norm(jnp.zeros((1, 2, 2, 6)), jnp.ones(scale_shape),
                       jnp.zeros(scale_shape), num_groups=num_groups,
                       epsilon=1e-6)


# The tutorial layout reaches every path: its 7x7 input conv and 3x3 convs (im2col
# gradient), its ConvNeXt blocks' 7x7 depthwise convs (shifted sums) and
# GroupNorms (fused norm) and its stride-2 down and transposed up convs (XLA's).
TINY_NET = unet_config("tutorial", base_channels=8, channel_mults=(1, 2),
                       num_res_blocks=1, attention=("none", "none"),
                       mid_attention="none")
# XLA's lowest backend optimisation level halves the compile time; both variants get it.
FAST_COMPILE = {"xla_backend_optimization_level": "0"}


def test_unet_routes_every_odd_kernel_conv_through_the_cpu_kernels_on_cpu():
  model = UNet(config=TINY_NET)
  x, t = jnp.zeros((2, 8, 8, 1)), jnp.array([3, 17])
  params = jax.eval_shape(
      lambda: model.init(jax.random.key(1), x, t, train=False))["params"]
  # Its odd-kernel convs are all stride-1 'SAME' (the 4x4 ones are strided): the 7x7 input
  # conv and, in each of its 6 ConvNeXt blocks (2 down, 2 middle, 1 up, 1 final), a 7x7
  # depthwise and two 3x3 convs.
  odd = sum(
      1 for p in jax.tree.leaves(params) if p.ndim == 4 and p.shape[0] % 2 == 1)
  assert odd == 1 + 6 * 3

  # And the GroupNorm(1) of each ConvNeXt block, two per block, through the fused norm.
  norms = sum(
      1 for path, _ in jax.tree_util.tree_leaves_with_path(params)
      if path[-2].key.startswith("GroupNorm_") and path[-1].key == "scale")
  assert norms == 6 * 2

  def count(name):
    with kernels.implementation(name):
      jaxpr = jax.make_jaxpr(
          lambda p: model.apply({"params": p}, x, t, train=False))(params)
    return str(jaxpr).count("custom_vjp_call")

  assert count("auto") == (odd + norms if ON_CPU else 0)
  assert count("xla") == 0


@pytest.mark.slow
def test_unet_has_the_same_params_outputs_and_gradients():
  model = UNet(config=TINY_NET)
  x = _normal(0, (2, 8, 8, 1))
  t = jnp.array([3, 17])
  shapes = {}
  for name in ("auto", "xla"):
    with kernels.implementation(name):
      shapes[name] = jax.eval_shape(
          lambda: model.init(jax.random.key(1), x, t, train=False))
  assert jax.tree.structure(shapes["auto"]) == jax.tree.structure(shapes["xla"])
  jax.tree.map(
      lambda a, b: (a.shape, a.dtype) ==
      (b.shape, b.dtype) or pytest.fail(f"{a} != {b}"), shapes["auto"],
      shapes["xla"])
  # Random parameters of that tree (the near-zero initialized convs would hide the gradients).
  leaves, tree = jax.tree.flatten(shapes["auto"]["params"])
  params = jax.tree.unflatten(
      tree, [0.3 * _normal(i, p.shape) for i, p in enumerate(leaves)])

  @jax.jit
  def loss_and_grad(params):

    def loss(params):
      out = model.apply({"params": params}, x, t, train=False)
      return jnp.mean(out**2), out

    return jax.value_and_grad(loss, has_aux=True)(params)

  results = {}
  for name in ("auto", "xla"):
    with kernels.implementation(name):
      results[name] = loss_and_grad.trace(params).lower().compile(FAST_COMPILE)(
          params)
  (_, out), grads = results["auto"]
  (_, ref), ref_grads = results["xla"]
  np.testing.assert_allclose(out, ref, rtol=1e-5,
                             atol=1e-5 * float(jnp.max(jnp.abs(ref))))
  jax.tree.map(
      lambda g, w: np.testing.assert_allclose(
          g, w, rtol=2e-4, atol=2e-5 * float(jnp.max(jnp.abs(w)))), grads,
      ref_grads)
