"""Package metadata for mmoe: a multi-task (MMoE) recommendation system on TFX.

Abstract requirements live here; exact versions are pinned in requirements.lock
(made by `make lock`, i.e. `uv pip compile setup.py`). `make setup` installs the
lock, then this package in editable mode without resolving anything again.
"""
from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    # TFX 1.16 is the newest TFX whose dependencies are published; it pins
    # TensorFlow 2.16 and Python < 3.11.
    "tfx==1.16.0",
    "tensorflow==2.16.2",
    # Our model is Keras 3 (tf.Transform/TFMA use tf_keras internally).
    "keras>=3.12,<3.13",
    # Beam stopped pulling dill in; tf.Transform imports it.
    "dill",
    "apache-beam>=2.60",
    "numpy>=1.26,<2",
    "pandas>=1.5,<2",
    "pyyaml>=6",
    # The same model runs on the JAX backend (tests run both on CPU).
    "jax[cpu]==0.4.34",
    # Serving: TF Serving's protos and stubs, plus gRPC health checking.
    "tensorflow-serving-api==2.16.1",
    "grpcio-health-checking",
    # Evaluation: AUC/bootstrap statistics, the gradient-boosting anchor, plots.
    "scikit-learn",
    "scipy",
    "matplotlib",
    # TFX's KubeflowV2DagRunner writes the pipeline spec with these protos
    # (`mmoe pipeline run --compile kubeflow`); kfp itself is not needed to compile.
    "kfp-pipeline-spec==0.2.2",
]

EXTRAS_REQUIRE = {"test": ["pytest", "pytest-timeout"]}

setup(
    name="mmoe",
    version="0.1.0",
    description="Multi-gate Mixture-of-Experts multi-task models on TFX, served over TF Serving's gRPC protocol.",
    packages=find_packages(include=["mmoe", "mmoe.*", "features", "features.*",
                                    "pipelines", "pipelines.*", "serving", "serving.*"]),
    package_data={"features": ["data/*", "configs/*"]},
    python_requires=">=3.10,<3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={"console_scripts": ["mmoe=pipelines.cli:main"]},
)
