"""Feature definitions and preprocessing for the MMoE recommender.

Modules (TFX taxi-template layout: what the data is, separate from how it is
preprocessed):

* `features.spec`      declarative DatasetSpec (columns, feature encodings, tasks);
* `features.io`        CSV reading/validation driven by a spec, random splits;
* `features.census`    the UCI Census-Income (KDD) spec, loader, downloader, bundled sample;
* `features.transform` tf.Transform preprocessing_fn and an in-process Beam runner;
* `features.synthetic` the MMoE paper's synthetic task-correlation data.

Importing `features` (or spec/io/census/synthetic) does not import TensorFlow;
only `features.transform` does.
"""
from features.spec import (WEIGHT_KEY, CategoricalFeature, DatasetSpec, HashedFeature, NumericFeature, Task,
                           dataset_spec_from_dict, dataset_spec_to_dict, load_dataset_spec, save_dataset_spec,
                           transformed_name)

__all__ = [
    "WEIGHT_KEY", "CategoricalFeature", "DatasetSpec", "HashedFeature", "NumericFeature", "Task",
    "dataset_spec_from_dict", "dataset_spec_to_dict", "load_dataset_spec", "save_dataset_spec",
    "transformed_name",
]
