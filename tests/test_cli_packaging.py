"""Packaging as a user meets it: installing prints no setuptools deprecation warning."""

from __future__ import annotations

import tomllib

from tests.conftest import REPO


def test_license_is_an_spdx_expression() -> None:
    """A ``{text = …}`` table makes setuptools ≥ 77 warn at every install (and fail the build
    after 2027-02-18); PEP 639 wants the SPDX string, which needs setuptools ≥ 77 to build."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert project["project"]["license"] == "Apache-2.0"
    assert "setuptools>=77" in project["build-system"]["requires"]
    assert not any(c.startswith("License ::") for c in project["project"].get("classifiers", []))
