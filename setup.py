"""autospace_jax: AutoSpace (Zhou et al., ICCV 2021) in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="autospace_jax",
    version="0.1.0",
    description="AutoSpace NAS in JAX/Flax: learn the search space, then search in it.",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",  # jax 0.10 needs 3.11.
    packages=find_packages(include=["autospace_jax", "autospace_jax.*"]),
    # Versions verified together on CPU (2026-11); see README.
    install_requires=[
        "jax==0.10.2",
        "jaxlib==0.10.2",
        "flax==0.12.8",
        "optax==0.2.8",
        "orbax-checkpoint==0.12.8",
        "tensorflow-datasets==4.9.10",
        "array_record==0.8.6",
        # Streaming input from 128 px on (autospace_jax/data/streaming.py).
        "grain==0.2.18",
        # gs:// run folders and data: etils.epath reads and writes GCS through gcsfs.
        "gcsfs==2026.10.1",
        "ml_collections==1.1.0",
        "clu==0.0.12",
        "absl-py==2.5.1",
        "numpy==2.4.6",
        "scikit-learn==1.9.1",
        "pillow==13.0.0",
        "tensorboardX==2.6.5",
        "matplotlib==3.11.2",
    ],
    extras_require={
        "test": [
            "pytest==9.2.0",
            # tests/compile_check_test.py compiles for a TPU on a CPU machine (libtpu, no TPU).
            "jax[tpu]==0.10.2; sys_platform == 'linux'",
            "pytest-xdist==3.8.0",  # README's test command runs two test processes.
            "hypothesis==6.170.17",
            "ruff==0.17.6",
            # tests/notebook_test.py runs notebooks/autospace_colab.ipynb in a kernel.
            "nbclient==0.11.0",
            "nbformat==5.11.1",
            "ipykernel==7.4.0",
            "jupyter_client==8.10.0",
        ],
    },
)
