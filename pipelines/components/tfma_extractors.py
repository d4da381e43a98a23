"""Evaluator customization: slice on the raw columns, not on their transformed ids.

The Evaluator reads labels through the serving model's `transform_features`
signature, whose outputs keep the feature names (`sex` -> vocabulary id).
TFMA's SliceKeyExtractor looks in the transformed features first, so slices
would read `sex=1` instead of `sex=Female`.  `custom_extractors` (found by the
Evaluator through `module_path=`) returns TFMA's default extractors with the
transformed features hidden from the slicer only; labels were already
extracted, and the features are put back right after slicing.
"""
from __future__ import annotations

import apache_beam as beam
import tensorflow_model_analysis as tfma
from tensorflow_model_analysis import constants
from tensorflow_model_analysis.extractors import extractor, slice_key_extractor

_HIDDEN = "_mmoe_hidden_transformed_features"


def _hide(extracts):
    extracts = dict(extracts)
    extracts[_HIDDEN] = extracts.pop(constants.TRANSFORMED_FEATURES_KEY, None)
    return extracts


def _restore(extracts):
    extracts = dict(extracts)
    hidden = extracts.pop(_HIDDEN, None)
    if hidden is not None:
        extracts[constants.TRANSFORMED_FEATURES_KEY] = hidden
    return extracts


def custom_extractors(eval_shared_model, eval_config, tensor_adapter_config):
    extractors = tfma.default_extractors(eval_shared_model=eval_shared_model, eval_config=eval_config,
                                         tensor_adapter_config=tensor_adapter_config)
    out = []
    for e in extractors:
        if e.stage_name == slice_key_extractor.SLICE_KEY_EXTRACTOR_STAGE_NAME:
            out.append(extractor.Extractor(stage_name="HideTransformedFeatures", ptransform=beam.Map(_hide)))
            out.append(e)
            out.append(extractor.Extractor(stage_name="RestoreTransformedFeatures", ptransform=beam.Map(_restore)))
        else:
            out.append(e)
    return out
