"""Custom TFX pieces, only where TFX 1.16 has no standard component.

* `spec_example_gen.Executor`: a FileBasedExampleGen executor that reads the
  files a `DatasetSpec` describes (headerless UCI files included) and writes
  tf.Examples typed as the spec says.  CsvExampleGen infers types from the
  values, so integer-coded categorical columns (census `year`,
  `det_ind_code`, ...) would become int64 features and the transform graph
  would no longer take the string tensors the serving signature parses.
* `spec_schema.ConformSchema`: holds SchemaGen's inferred schema to the
  dataset spec (required columns, the spec's types and scalar shapes, label
  values closed, categorical inputs open to new values); TFX has no component
  that edits a schema.
* `anomaly_gate.AnomalyGate`: fails the run when ExampleValidator found
  anomalies, naming the features, so nothing downstream trains or pushes.
* `pusher.Executor`: TFX's Pusher executor, except that a model that already
  is the newest served version is not copied again as a new version.
"""
