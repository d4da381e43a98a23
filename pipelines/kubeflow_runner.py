"""Compile the pipeline for Kubeflow Pipelines v2 / Vertex AI Pipelines (`KubeflowV2DagRunner`).

    mmoe pipeline run --data gs://BUCKET/data --pipeline-root gs://BUCKET/root --serving-dir gs://BUCKET/serving \\
        --compile kubeflow --output mmoe_pipeline.json --image REGISTRY/mmoe:TAG

writes a PipelineSpec JSON to submit with the KFP client or Vertex AI
(`aiplatform.PipelineJob(template_path="mmoe_pipeline.json", ...)`).  Every
component runs in `--image`, which must hold this repository installed
(`pip install .`) on top of TFX 1.16 (e.g. `FROM gcr.io/tfx-oss-public/tfx:1.16.0`),
because the components import `features`, `mmoe`, `serving` and `pipelines`.
A curated schema (`--schema FILE`) is copied under the pipeline root for
ImportSchemaGen; with a gs:// root it is written there directly (through
TFX's filesystem layer).
Compiling needs `kfp-pipeline-spec` (only its protos; no Kubernetes access).
"""
from __future__ import annotations

import json
import os
from typing import List, Optional

from pipelines import pipeline as pl
from pipelines.configs import PipelineConfig

DEFAULT_IMAGE = "gcr.io/tfx-oss-public/tfx:1.16.0"


def compile_kubeflow(config: PipelineConfig, *, data: str, pipeline_root: str, serving_dir: str, output: str,
                     image: str = DEFAULT_IMAGE, schema_file: Optional[str] = None,
                     beam_args: Optional[List[str]] = None) -> str:
    """Write the KFP v2 PipelineSpec JSON to `output`; returns its path."""
    try:
        from tfx.orchestration.kubeflow.v2 import kubeflow_v2_dag_runner as kv2
    except ImportError as e:
        raise ValueError(f"--compile kubeflow needs the kfp-pipeline-spec package ({e}); "
                         f"pip install kfp-pipeline-spec==0.2.2") from None
    pipeline = pl.create_pipeline(config, data=data, pipeline_root=pipeline_root, serving_dir=serving_dir,
                                  schema_file=schema_file, beam_args=beam_args)
    output = os.path.abspath(output)
    os.makedirs(os.path.dirname(output), exist_ok=True)
    runner = kv2.KubeflowV2DagRunner(config=kv2.KubeflowV2DagRunnerConfig(default_image=image),
                                     output_dir=os.path.dirname(output), output_filename=os.path.basename(output))
    runner.run(pipeline, write_out=True)
    return output


def component_names(spec_path: str) -> List[str]:
    """Task names in a compiled PipelineSpec JSON (for checks and the CLI's message)."""
    with open(spec_path) as fh:
        spec = json.load(fh)
    spec = spec.get("pipelineSpec", spec)
    return sorted(spec["root"]["dag"]["tasks"])
