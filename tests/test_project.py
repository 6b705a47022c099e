"""The project's set-up files agree with each other."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def pins(lines):
    return {line.strip().lstrip("- ").strip() for line in lines if "==" in line and not line.strip().startswith("#")}


def test_conda_environment_pins_the_same_packages_as_requirements():
    requirements = pins((ROOT / "requirements.txt").read_text().splitlines())
    requirements |= pins((ROOT / "requirements-trackers.txt").read_text().splitlines())
    conda = pins((ROOT / "environment.yml").read_text().splitlines())
    assert requirements == conda
    assert {"torch==2.14.1", "torchvision==0.29.1"} <= requirements
