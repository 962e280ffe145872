from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
version = {}
for line in (here / "fusion" / "__init__.py").read_text().splitlines():
    if line.startswith("__version__"):
        version["v"] = line.split("=")[1].strip().strip('"')

setup(
    name="fusion",
    version=version["v"],
    description="Compare, align and merge PyTorch models through permutation symmetries",
    long_description=(here / "README.md").read_text() if (here / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["fusion", "fusion.*"]),
    python_requires=">=3.10",
    install_requires=[
        line.strip()
        for line in (here / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ],
    extras_require={"test": ["pytest>=7", "hypothesis>=6", "pyyaml>=5", "transformers>=4.40", "timm>=0.9",
                             "mlflow-skinny>=2.10"],
                    "yaml": ["pyyaml>=5"], "hf": ["transformers>=4.40", "timm>=0.9"],
                    "mlflow": ["mlflow-skinny>=2.10"],
                    "merge": ["pyyaml>=5", "safetensors>=0.4", "transformers>=4.40"]},
    entry_points={"console_scripts": ["fusion=fusion.cli:main"]},
)
