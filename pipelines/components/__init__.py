"""Custom TFX pieces, only where TFX 1.16 has no standard component.

* `spec_example_gen.Executor`: a FileBasedExampleGen executor that reads the
  files a `DatasetSpec` describes (headerless UCI files included) and writes
  tf.Examples typed as the spec says.  CsvExampleGen infers types from the
  values, so integer-coded categorical columns (census `year`,
  `det_ind_code`, ...) would become int64 features and the transform graph
  would no longer take the string tensors the serving signature parses.
* `anomaly_gate.AnomalyGate`: fails the run when ExampleValidator found
  anomalies, naming the features, so nothing downstream trains or pushes.
"""
