"""tdm_jax: Trajectory Distribution Matching distillation of diffusion models in JAX/Flax."""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax>=0.10.0",
    "flax>=0.12.0",
    "optax>=0.2.5",
    "orbax-checkpoint>=0.12.0",
    "ml_collections>=1.1.0",
    "absl-py>=2.1.0",
    "tensorflow-datasets>=4.9.8",
    "importlib_resources>=6.0",  # tfds imports it (undeclared) when it writes a dataset defined in a package
    "diffusers>=0.40.0",
    "transformers>=5.0.0",
    "safetensors>=0.5.0",
    "numpy>=2.0",
    "tqdm>=4.66",
    "pillow>=10.0",
    "tensorboardX>=2.6.2",
    "scipy>=1.11",  # the evaluator's Frechet distance (matrix square root)
    "sentencepiece>=0.2",  # T5 tokenizers from spiece.model (PixArt's tokenizer/ folders)
    "protobuf>=4.21",  # read by Transformers when it converts a spiece.model
    "imageio>=2.31",  # MP4 clips of video teachers, through Diffusers' export_to_video
    "imageio-ffmpeg>=0.5",  # the ffmpeg imageio writes MP4 with (shipped inside the wheel)
]

EXTRAS_REQUIRE = {
    # torch is only a parity reference in tests; install torch==2.13.0 (the CPU build) first,
    # then this range installs nothing more. Runtime code never imports torch. pytest-xdist runs the
    # suite on two workers; nbclient, nbformat and ipykernel execute launch/colab_tpu.ipynb.
    "test": ["pytest>=8.0", "pytest-xdist>=3.5", "nbclient>=0.10", "nbformat>=5.10", "ipykernel>=6.29", "torch>=2.4,<=2.14.1", "peft>=0.17"],
    "gpu": ["jax[cuda12]"],
    "tpu": ["jax[tpu]"],
}

setup(
    name="tdm_jax",
    version="0.1.0",
    description="Distil diffusion models into few-step generators with Trajectory Distribution Matching (JAX/Flax).",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["tdm_jax", "tdm_jax.*"]),
    # The shipped shapes teachers (SDXL-, PixArt- and SD3-style Diffusers folders), the evaluators (images, video) and
    # prompt files.
    package_data={"tdm_jax": ["assets/shapes/*.txt", "assets/shapes/evaluator/*", "assets/shapes/pipeline/*.json",
                              "assets/shapes/pipeline/*/*", "assets/shapes_pixart/pipeline/*.json",
                              "assets/shapes_pixart/pipeline/*/*", "assets/shapes_sd3/pipeline/*.json",
                              "assets/shapes_sd3/pipeline/*/*", "assets/shapes_cogvideox/evaluator/*",
                              "assets/shapes_cogvideox/*.txt", "assets/shapes_cogvideox/pipeline/*.json",
                              "assets/shapes_cogvideox/pipeline/*/*"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={"console_scripts": ["tdm_jax=tdm_jax.main:entry_point"]},
)
