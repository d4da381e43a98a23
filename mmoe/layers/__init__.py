"""Keras 3 layers of the multi-task models, built only on `keras.ops`."""
from mmoe.layers.cross import FeatureCross
from mmoe.layers.embedding import FeatureEmbedding
from mmoe.layers.experts import ExpertBank
from mmoe.layers.gates import Gate, importance_cv_squared
from mmoe.layers.mixture import ExpertMixture
from mmoe.layers.mlp import MLP, TaskHead
from mmoe.layers.piecewise import PiecewiseLinearEncoding

__all__ = ["ExpertBank", "ExpertMixture", "FeatureCross", "FeatureEmbedding", "Gate", "MLP",
           "PiecewiseLinearEncoding", "TaskHead", "importance_cv_squared"]
