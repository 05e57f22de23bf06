"""The HyperPod image recipe (slurm/container/Dockerfile) installs what setup.cfg allows.

Nothing here can build the image (no Docker, GPU or EFA); what can be checked is that the
versions it pins are the ones the package is tested with, and that it installs this package
from setup.cfg rather than a second, drifting list of requirements.
"""
from __future__ import annotations

import configparser
import re

from packaging.requirements import Requirement

from megatron_ext import node_check
from tests.conftest import REPO

DOCKERFILE = REPO / "slurm" / "container" / "Dockerfile"


def _requirements() -> dict[str, Requirement]:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    lines = cfg["options"]["install_requires"].splitlines()
    lines += cfg["options.extras_require"]["gpu"].splitlines()
    reqs = [Requirement(line) for line in lines if line.strip() and not line.strip().startswith("#")]
    return {r.name.lower(): r for r in reqs}


def _pins(text: str) -> dict[str, str]:
    """``ARG MEGATRON_CORE_VERSION=0.16.1`` -> {"megatron-core": "0.16.1"}."""
    return {name.lower().replace("_", "-"): version for name, version in
            re.findall(r"^ARG ([A-Z0-9_]+)_VERSION=v?(\S+)$", text, re.MULTILINE)}


def test_the_image_pins_the_versions_setup_cfg_allows() -> None:
    text = DOCKERFILE.read_text()
    pins, requirements = _pins(text), _requirements()
    checked = {name: version for name, version in pins.items() if name in requirements}
    assert "megatron-core" in checked, pins
    for name, version in checked.items():
        assert requirements[name].specifier.contains(version), (
            f"Dockerfile pins {name}=={version}; setup.cfg allows {requirements[name]}")
    # the pinned version is what pip installs, and the rest comes from setup.cfg itself
    assert 'pip install --no-cache-dir "megatron-core==${MEGATRON_CORE_VERSION}"' in text
    assert 'pip install --no-cache-dir -e "/opt/slurm-llm[gpu]"' in text


def test_a_pin_outside_setup_cfg_s_range_is_caught() -> None:
    bad = DOCKERFILE.read_text().replace("MEGATRON_CORE_VERSION=0.16.1", "MEGATRON_CORE_VERSION=0.17.0")
    assert not _requirements()["megatron-core"].specifier.contains(_pins(bad)["megatron-core"])


def test_the_image_is_what_aws_s_references_build_and_the_ranks_find_their_scripts() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM nvcr\.io/nvidia/pytorch:\S+-py3$", text, re.MULTILINE)
    assert "./efa_installer.sh -y -g -d --skip-kmod --skip-limit-conf --no-verify" in text
    assert "--with-libfabric=/opt/amazon/efa" in text and "/opt/aws-ofi-nccl/lib" in text
    # an editable install at /opt/slurm-llm keeps slurm/ beside the package, where
    # megatron_ext.node_check looks for the health check of the same version
    assert "COPY . /opt/slurm-llm" in text
    assert node_check.SCRIPT == (REPO / "slurm" / "healthcheck.sh").resolve()
    assert (REPO / "slurm" / "container" / "Dockerfile.dockerignore").read_text().count(".venv")
