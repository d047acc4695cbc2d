"""Estimators: pure tensor functions from step Jacobians to spectral norms, lag norms and factors.

Names are loaded on first use (PEP 562): ``gradwatch.estimators.reach`` (plain floats) is read by the
detector and the report, which must not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gradwatch._lazy import lazy_attributes

if TYPE_CHECKING:
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

_LAZY_ATTRIBUTES: dict[str, str] = {
    "ActivationStatistics": "gradwatch.estimators.factors",
    "AnalyticStepJacobians": "gradwatch.estimators.jacobian",
    "EstimatorSettings": "gradwatch.estimators.layer",
    "FunctionStepJacobians": "gradwatch.estimators.jacobian",
    "GradientStats": "gradwatch.estimators.gradients",
    "LagNormEstimate": "gradwatch.estimators.products",
    "LayerEstimate": "gradwatch.estimators.layer",
    "SpectralNormEstimate": "gradwatch.estimators.power_iteration",
    "StepJacobians": "gradwatch.estimators.jacobian",
    "WarmStart": "gradwatch.estimators.layer",
    "activation_statistics": "gradwatch.estimators.factors",
    "builtin_step_jacobians": "gradwatch.estimators.jacobian",
    "default_lags": "gradwatch.estimators.products",
    "estimate_lag_norms": "gradwatch.estimators.products",
    "estimate_layer": "gradwatch.estimators.layer",
    "function_step_jacobians": "gradwatch.estimators.jacobian",
    "gradient_norms": "gradwatch.estimators.gradients",
    "lag_norms": "gradwatch.estimators.products",
    "layer_metrics": "gradwatch.estimators.layer",
    "lyapunov_from_full_products": "gradwatch.estimators.products",
    "lyapunov_max": "gradwatch.estimators.products",
    "spectral_norm": "gradwatch.estimators.power_iteration",
    "spectral_norm_lanczos": "gradwatch.estimators.power_iteration",
    "spectral_norm_power_iteration": "gradwatch.estimators.power_iteration",
    "weight_spectral_norm": "gradwatch.estimators.factors",
}

__getattr__, __dir__ = lazy_attributes(__name__, _LAZY_ATTRIBUTES, globals())

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
