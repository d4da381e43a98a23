"""The dataset spec's schema contract, and ConformSchema: SchemaGen's inferred schema held to it.

With no curated schema (`--schema FILE`), the pipeline infers one with TFX's
SchemaGen and passes it through `ConformSchema` before ExampleValidator and
Transform use it.  SchemaGen's inference is kept (value domains, everything
TFDV records) except where it contradicts the spec, because the raw inferred
schema is wrong for this pipeline in three ways:

* shapes: every column is inferred as shape [1]; the transform and the serving
  signature take one value per example (`features.transform.raw_feature_spec`,
  FixedLenFeature shape []), so the spec's scalar shape replaces it;
* closed string domains on categorical inputs: a category value the first data
  did not have would be an anomaly and stop the run, yet a new value is
  expected (the vocabulary maps it to the OOV bucket).  The domain stays (it
  documents the values and helps curation) with
  `distribution_constraints.min_domain_mass: 0`, so unseen values are allowed;
  a curated schema may raise it to bound the share of unseen values;
* the contract: inference takes whatever the first data holds, so a column
  missing or holding text instead of numbers would be baked into the schema.
  Every column the spec uses is required (presence 1) with the spec's type
  (float for numeric columns, bytes otherwise), so a missing column or a
  wrong type is an anomaly even on the first run.  Label columns with listed
  values keep a closed domain, widened by the listed values the data lacked.

TFX 1.16 has no component that edits a schema (SchemaGen only infers,
ImportSchemaGen only imports), hence this small function component.
"""
# No `from __future__ import annotations`: the @component decorator reads the real annotations.
import json
import os

from tfx import v1 as tfx

SCHEMA_FILE = "schema.pbtxt"  # the file name SchemaGen and ImportSchemaGen write


def spec_schema(spec):
    """The schema_pb2.Schema the DatasetSpec implies for the raw examples: each used column present once,
    float or bytes as the spec says, label columns limited to their listed values, no closed domain on inputs."""
    from tensorflow_transform.tf_metadata import schema_utils

    from features.transform import raw_feature_spec

    schema = schema_utils.schema_from_feature_spec(raw_feature_spec(spec))
    for column, values in label_domains(spec).items():
        domain = schema.string_domain.add(name=column)
        domain.value.extend(values)
        for feature in schema.feature:
            if feature.name == column:
                feature.domain = column
    return schema


def label_domains(spec):
    """{label column: listed values} for tasks that list their values (value-list labels)."""
    domains = {}
    for t in spec.tasks:
        if t.values is not None:
            values = domains.setdefault(t.column, [])
            values += [v for v in t.values if v not in values]
    return domains


def _string_domain(schema, feature):
    """The StringDomain a feature uses (inline or by name), or None."""
    if feature.HasField("string_domain"):
        return feature.string_domain
    if feature.WhichOneof("domain_info") == "domain":
        return next((d for d in schema.string_domain if d.name == feature.domain), None)
    return None


def conform_schema(inferred, spec):
    """A copy of `inferred` (SchemaGen's schema) held to the spec's contract (see the module docstring)."""
    from tensorflow_metadata.proto.v0 import schema_pb2

    schema = schema_pb2.Schema()
    schema.CopyFrom(inferred)
    contract = {f.name: f for f in spec_schema(spec).feature}
    present = {f.name: f for f in schema.feature}
    categorical_inputs = {name for name in spec.feature_names if contract[name].type == schema_pb2.BYTES}
    labels = label_domains(spec)
    for name, required in contract.items():
        feature = present.get(name)
        if feature is None:  # not in the data SchemaGen saw: required all the same, so the validator reports it
            feature = schema.feature.add(name=name)
        if feature.type != required.type:  # inferred from bad data: the spec's type wins
            feature.ClearField("domain_info")
            feature.type = required.type
        feature.ClearField("value_count")
        feature.ClearField("value_counts")
        feature.shape.CopyFrom(required.shape)  # scalar: FixedLenFeature [] in the transform
        feature.presence.CopyFrom(required.presence)
        domain = _string_domain(schema, feature)
        if name in labels:
            if domain is None:
                domain = schema.string_domain.add(name=name)
                feature.domain = name
            domain.value.extend(v for v in labels[name] if v not in set(domain.value))
        elif name in categorical_inputs and domain is not None:
            feature.distribution_constraints.min_domain_mass = 0.0  # a new category value is not an anomaly
    return schema


@tfx.dsl.components.component
def ConformSchema(inferred: tfx.dsl.components.InputArtifact[tfx.types.standard_artifacts.Schema],
                  schema: tfx.dsl.components.OutputArtifact[tfx.types.standard_artifacts.Schema],
                  dataset: tfx.dsl.components.Parameter[str],
                  code: tfx.dsl.components.Parameter[str] = "") -> None:
    """Writes conform_schema(inferred, spec) as `schema.pbtxt`; `dataset` is the spec dict as JSON
    (`code`, the source fingerprint, only keys the cache)."""
    from google.protobuf import text_format
    from tensorflow_metadata.proto.v0 import schema_pb2
    from tfx.dsl.io import fileio

    from features.spec import dataset_spec_from_dict

    del code
    spec = dataset_spec_from_dict(json.loads(dataset), source="ConformSchema dataset")
    with fileio.open(os.path.join(inferred.uri, SCHEMA_FILE), "r") as fh:
        parsed = text_format.Parse(fh.read(), schema_pb2.Schema())
    fileio.makedirs(schema.uri)
    with fileio.open(os.path.join(schema.uri, SCHEMA_FILE), "w") as fh:
        fh.write(text_format.MessageToString(conform_schema(parsed, spec)))
