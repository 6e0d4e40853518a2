"""artaug-ext: ArtAug (arXiv 2412.12888) for DiffSynth-Studio FLUX, with Triton kernels."""


import re

from setuptools import find_packages, setup

# The one definition of the version is artaug_ext.__version__.
version = re.search(r'^__version__ = "([^"]+)"', open("artaug_ext/__init__.py", encoding="utf-8").read(), re.M).group(1)

triton_req = "triton>=3.4; platform_system == 'Linux' and platform_machine == 'x86_64'"

setup(
    name="artaug-ext",
    version=version,
    description="ArtAug synthesis-understanding interaction for FLUX.1 on DiffSynth-Studio, with fused Triton kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["artaug_ext", "artaug_ext.*"]) + ["artaug_kernels", "artaug_recipes"],
    # The Triton kernels live in kernels/artaug_kernels/ and install as `artaug_kernels`.
    # kernels/ itself holds no __init__.py: from the repository root a regular package named
    # `kernels` would shadow Hugging Face's `kernels` package, which transformers >= 5.25
    # imports (CUDAProperties) and DiffSynth probes for.
    # The recipes (recipes/) install as `artaug_recipes`, so `artaug demo` finds them in any install.
    package_dir={"artaug_kernels": "kernels/artaug_kernels", "artaug_recipes": "recipes"},
    package_data={"artaug_ext": ["assets/*", "assets/**/*", "interact/templates/*", "interact/*.json"],
                  "artaug_recipes": ["*.toml", "*.txt", "accelerate/*.yaml"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.4",
        triton_req,
        "diffsynth==2.1.12",
        "modelscope",
        "huggingface_hub",
        "transformers>=4.46",
        "tokenizers>=0.20",
        "peft",
        "safetensors",
        "einops",
        "accelerate",
        "tqdm",
        "numpy",
        "scipy",
        "pillow",
        "matplotlib",
        "tomli>=1.1; python_version < '3.11'",
    ],
    # playwright drives the system Chromium in the report tests (its own browser download is never used)
    # import-linter checks the architecture table (docs/architecture.md, .importlinter) in the tests
    # tensorboard: `[train] log_with = "tensorboard"` (accelerate logs nothing without it; the recipe check says so);
    # the tests read the event files a run writes
    # docs: the manual as a website (mkdocs.yml; `mkdocs build --strict` in CI), the API page by mkdocstrings
    # quant: DiffSynth's quantisation backends (`[run] quantize`, torchao) and the 8-bit optimiser
    # (`[train] optimizer = "adamw8bit"`, bitsandbytes); never needed by the tiny model's main job.
    # The test extra includes it so the quantised runs are tested.
    # pytest-xdist: the README's test command runs the suite in two processes (2 cores: ~23 min instead of ~35)
    extras_require={"test": ["pytest>=7", "pytest-xdist>=3.2", "ruff", "playwright", "import-linter>=2.1", "tensorboard",
                             "torchao>=0.16", "bitsandbytes>=0.45"],
                    "quant": ["torchao>=0.16", "bitsandbytes>=0.45"],
                    "tensorboard": ["tensorboard"],
                    "docs": ["mkdocs>=1.6", "mkdocs-material>=9.5", "mkdocstrings[python]>=1.0"]},
    entry_points={"console_scripts": ["artaug=artaug_ext.cli:main"]},
)
