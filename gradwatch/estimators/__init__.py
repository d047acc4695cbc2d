"""Estimators: pure tensor functions from step Jacobians to spectral norms, lag norms and factors."""

from gradwatch.estimators.factors import ActivationStatistics, activation_statistics, weight_spectral_norm
from gradwatch.estimators.gradients import GradientStats, gradient_norms
from gradwatch.estimators.jacobian import (
    AnalyticStepJacobians,
    FunctionStepJacobians,
    StepJacobians,
    builtin_step_jacobians,
    function_step_jacobians,
)
from gradwatch.estimators.layer import (
    EstimatorSettings,
    LayerEstimate,
    WarmStart,
    estimate_layer,
    layer_metrics,
)
from gradwatch.estimators.power_iteration import (
    SpectralNormEstimate,
    spectral_norm,
    spectral_norm_lanczos,
    spectral_norm_power_iteration,
)
from gradwatch.estimators.products import (
    LagNormEstimate,
    default_lags,
    estimate_lag_norms,
    lag_norms,
    lyapunov_from_full_products,
    lyapunov_max,
)

__all__ = [
    "ActivationStatistics",
    "AnalyticStepJacobians",
    "EstimatorSettings",
    "FunctionStepJacobians",
    "GradientStats",
    "LagNormEstimate",
    "LayerEstimate",
    "SpectralNormEstimate",
    "StepJacobians",
    "WarmStart",
    "activation_statistics",
    "builtin_step_jacobians",
    "default_lags",
    "estimate_lag_norms",
    "estimate_layer",
    "function_step_jacobians",
    "gradient_norms",
    "lag_norms",
    "layer_metrics",
    "lyapunov_from_full_products",
    "lyapunov_max",
    "spectral_norm",
    "spectral_norm_lanczos",
    "spectral_norm_power_iteration",
    "weight_spectral_norm",
]
