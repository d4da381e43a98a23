"""mmoe: Multi-gate Mixture-of-Experts multi-task models in Keras 3.

Backend-agnostic (only `keras.ops`): the same model trains on the TensorFlow
backend with XLA and on JAX. Nothing here imports TensorFlow, TFX or serving
code; data flows `features -> mmoe -> pipelines / serving`.
"""
from mmoe.config import ARCHITECTURES, InputFeature, ModelConfig, TaskSpec
from mmoe.models import GATES_SUFFIX, build_model, compile_model, with_gate_outputs

__version__ = "0.1.0"
__all__ = ["ARCHITECTURES", "GATES_SUFFIX", "InputFeature", "ModelConfig", "TaskSpec", "build_model",
           "compile_model", "with_gate_outputs"]
