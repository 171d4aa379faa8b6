"""Hygiene: the public API imports, Docker and launch files are well formed, requirements pin
torch, and every nn block passes Opacus' validator."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("module", ["lit_dpvae.privacy", "lit_dpvae.models", "lit_dpvae.data",
                                    "lit_dpvae.callbacks", "lit_dpvae.metrics"])
def test_star_import_exports_what_all_lists(module):
    mod = importlib.import_module(module)
    namespace: dict = {}
    exec(f"from {module} import *", namespace)  # noqa: S102 - the test is the star import
    assert set(mod.__all__) <= set(namespace)


def test_privacy_package_does_not_import_lightning():
    import subprocess
    import sys

    code = "import sys, lit_dpvae.privacy; print('lightning' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout.strip()
    assert out == "False"


def test_requirements_pin_torch_and_every_package():
    lines = [ln.strip() for ln in (ROOT / "requirements.txt").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert "torch==2.13.0" in lines
    assert all("==" in ln for ln in lines), "every requirement is pinned"


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_dockerfiles_are_well_formed(name):
    text = (ROOT / "docker" / name).read_text()
    instructions = [ln.split()[0] for ln in text.splitlines()
                    if ln.strip() and not ln.startswith("#") and not ln.startswith(" ")]
    allowed = {"FROM", "RUN", "WORKDIR", "COPY", "ENV", "ENTRYPOINT", "CMD", "ARG"}
    assert instructions[0] == "FROM" and set(instructions) <= allowed
    assert "requirements.txt" in text and '"-m", "lit_dpvae"' in text


@pytest.mark.parametrize("name", ["torchrun.sh", "slurm.sbatch"])
def test_launch_scripts_call_the_cli(name):
    text = (ROOT / "docker" / name).read_text()
    assert text.startswith("#!/usr/bin/env bash")
    assert re.search(r"-m lit_dpvae fit", text)


def test_readme_states_the_test_command_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python -m pytest" in readme and "python -m pytest" in ci


def test_pyproject_declares_the_requirements_pins():
    """``pip install .`` installs exactly the runtime pins of requirements.txt (the dev tools are
    the ``dev`` extra), only the ``lit_dpvae`` package, and the ``lit-dpvae`` console script."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pins = [ln.strip() for ln in (ROOT / "requirements.txt").read_text().splitlines()
            if ln.strip() and not ln.startswith("#")]
    dev = project["project"]["optional-dependencies"]["dev"]
    assert sorted(project["project"]["dependencies"] + dev) == sorted(pins)
    assert project["tool"]["setuptools"]["packages"]["find"]["include"] == ["lit_dpvae*"]
    assert project["project"]["scripts"]["lit-dpvae"] == "lit_dpvae.entry:main"
    import lit_dpvae

    assert lit_dpvae.__version__ == project["project"]["version"]  # the report's fallback
    assert "build-system" in project
