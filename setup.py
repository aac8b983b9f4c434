"""Install FastV Advanced: `pip install -e .` (install torch first, pinned, to avoid pulling a CUDA build)."""

from setuptools import find_packages, setup

setup(
    name="fastv_advanced",
    version="0.1.0",
    description="FastV visual-token pruning for transformers' LLaVA with pluggable token-selection strategies",
    package_dir={"": "src"},
    packages=find_packages("src"),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "transformers>=5.20,<6",
        "tokenizers>=0.21",
        "pillow>=10",
        "tqdm>=4.60",
        "numpy>=1.24",
        "sentencepiece>=0.1.99",
        "protobuf>=3.20",
    ],
    entry_points={
        "console_scripts": [
            "fastv-eval-scivqa=fastv_advanced.cli.eval_scivqa:main",
            "fastv-sweep=fastv_advanced.cli.sweep:main",
            "fastv-compare=fastv_advanced.cli.compare:main",
            "fastv-visualize=fastv_advanced.cli.visualize:main",
            "fastv-merge-chunks=fastv_advanced.cli.merge_chunks:main",
            "fastv-convert=fastv_advanced.cli.convert:main",
        ],
        # lmms-eval finds `--model fastv_llava` here (fastv_advanced/lmms_eval_model.py)
        "lmms_eval.models": ["fastv_llava=fastv_advanced.lmms_eval_model:manifest"],
    },
    extras_require={
        # datasets (with pyarrow) installs in seconds: the HF-datasets tests run in CI.
        "test": ["pytest>=8", "accelerate>=1.0", "datasets>=2.18"],
        "plot": ["matplotlib>=3.7"],
        "accelerate": ["accelerate>=1.0"],
        "hf": ["datasets>=2.18"],
        # the version the plugin is tested with; it requires torchvision, whose wheel must match your torch build
        "lmms-eval": ["lmms-eval==0.7.3"],  # --hf-dataset: ScienceQA from HF datasets (lmms-lab/ScienceQA, derek-thomas/...)
    },
)
