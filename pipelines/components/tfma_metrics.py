"""TFMA metrics TFMA 0.47 lacks natively: RMSE, derived from its MeanSquaredError.

Referenced from the EvalConfig as `MetricConfig(class_name="RootMeanSquaredError",
module="pipelines.components.tfma_metrics")` for regression heads.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional

from tensorflow_model_analysis.metrics import mean_regression_error, metric_types, metric_util

ROOT_MEAN_SQUARED_ERROR_NAME = "root_mean_squared_error"


class RootMeanSquaredError(metric_types.Metric):
    """sqrt(mean squared error) of a regression head."""

    def __init__(self, name: str = ROOT_MEAN_SQUARED_ERROR_NAME):
        super().__init__(metric_util.merge_per_key_computations(_rmse_computations), name=name)


def _rmse_computations(name: str = ROOT_MEAN_SQUARED_ERROR_NAME, eval_config=None, model_name: str = "",
                       output_name: str = "", sub_key: Optional[metric_types.SubKey] = None,
                       aggregation_type=None, class_weights=None, example_weighted: bool = False):
    key = metric_types.MetricKey(name=name, model_name=model_name, output_name=output_name, sub_key=sub_key,
                                 example_weighted=example_weighted)
    computations = mean_regression_error._mean_squared_error_computations(  # pylint: disable=protected-access
        name=f"_{name}_mse", eval_config=eval_config, model_name=model_name, output_name=output_name,
        example_weighted=example_weighted, sub_key=sub_key, aggregation_type=aggregation_type,
        class_weights=class_weights)
    mse_key = computations[-1].keys[-1]

    def result(metrics: Dict[metric_types.MetricKey, Any]) -> Dict[metric_types.MetricKey, Any]:
        mse = metrics[mse_key]
        return {key: math.sqrt(mse) if mse is not None and mse >= 0 else float("nan")}

    computations.append(metric_types.DerivedMetricComputation(keys=[key], result=result))
    return computations


metric_types.register_metric(RootMeanSquaredError)
