"""The diffusion math, apart from any network.

Modules:
  schedules: the beta schedule, an immutable pytree of arrays.
  gaussian: the forward process q(x_t | x_0), its posterior and the
    conversions between eps, x0 and v predictions.
  processes: EDM and flow matching, the continuous processes beside the
    discrete schedule, with the conversions solvers and losses need.
  losses: denoising losses and per-step weights for any `model_fn(x_t, t)`.
  likelihood: DDPM's variational bound in bits per dimension.
  ode_likelihood: log-likelihood through the probability-flow ODE of a
    continuous process (diffrax; the 'likelihood' extra).
  respace: a process over a subset of the steps.
  guidance: classifier-free guidance of a conditional denoiser.
  thresholding: dynamic thresholding of any denoiser's x0 prediction.
  testing: Gaussian mixtures with exact denoisers (test oracles).

The forward-process functions are re-exported here, so
`ddpm_jax.diffusion.q_sample` is `ddpm_jax.diffusion.gaussian.q_sample`.
"""

from ddpm_jax.diffusion.gaussian import (
    MEAN_FORMS,
    TARGETS,
    VAR_TYPES,
    ModelFn,
    PMeanVariance,
    extract,
    p_mean_variance,
    predict_eps_from_v,
    predict_eps_from_x0,
    predict_x0_eps,
    predict_x0_from_eps,
    predict_x0_from_v,
    q_mean_variance,
    q_posterior_mean_variance,
    q_sample,
    split_model_output,
    training_target,
    velocity,
)
from ddpm_jax.diffusion.schedules import Schedule, make_schedule

__all__ = [
    "MEAN_FORMS",
    "TARGETS",
    "VAR_TYPES",
    "ModelFn",
    "PMeanVariance",
    "Schedule",
    "extract",
    "make_schedule",
    "p_mean_variance",
    "predict_eps_from_v",
    "predict_eps_from_x0",
    "predict_x0_eps",
    "predict_x0_from_eps",
    "predict_x0_from_v",
    "q_mean_variance",
    "q_posterior_mean_variance",
    "q_sample",
    "split_model_output",
    "training_target",
    "velocity",
]
