"""What is written about the settings in more than one place agrees with the one declaration
in lb/settings.py: the README's table, and the environment docker-compose.yml and
swarm-stack.yml pass on."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from lb.settings import PREFIX, Settings, settings_table
from tests.conftest import unavailable

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
COMPOSE = ROOT / "docker-compose.yml"
STACK = ROOT / "swarm-stack.yml"


def test_readme_settings_table_is_current() -> None:
    text = README.read_text()
    start = text.index("<!-- settings:start -->") + len("<!-- settings:start -->")
    end = text.index("<!-- settings:end -->")
    assert text[start:end].strip() == settings_table(markdown=True), (
        "README settings table is stale: run `make settings-table`")


# Set by the compose deployment itself, not from the shell.
COMPOSE_FIXED = {"LB_BACKEND", "LB_HOST", "LB_PORT", "LB_REGISTRY", "LB_DOCKER_ADDRESS"}
# ... and by the Swarm stack (both services are on the replicas' overlay network).
STACK_FIXED = {"LB_BACKEND", "LB_HOST", "LB_PORT", "LB_REGISTRY", "LB_SWARM_ADDRESS"}
# Defaults both container deployments change on purpose (their files say why).
COMPOSE_OWN_DEFAULTS = {"LB_START_TIMEOUT"}
FROM_SHELL = re.compile(r"^\$\{(LB_[A-Z_]+):-(.*)\}$")


@pytest.mark.parametrize(("path", "fixed"), [(COMPOSE, COMPOSE_FIXED), (STACK, STACK_FIXED)],
                         ids=["compose", "swarm-stack"])
def test_compose_passes_every_setting_on_with_its_default(path: Path, fixed: set[str]) -> None:
    env = yaml.safe_load(path.read_text())["x-settings"]
    fields = {PREFIX + f.name.upper(): f.name for f in dataclasses.fields(Settings)}
    assert sorted(set(fields) - set(env)) == [], "settings docker-compose.yml does not pass on"
    assert sorted(k for k in env if k.startswith(PREFIX) and k not in fields) == []
    defaults = Settings()
    for var, name in fields.items():
        value = str(env[var])
        match = FROM_SHELL.match(value)
        if var in fixed:
            assert match is None, f"{var} is fixed by the deployment, not taken from the shell"
            continue
        assert match is not None and match.group(1) == var, f"{var}: {value}"
        if var not in COMPOSE_OWN_DEFAULTS:
            parsed = getattr(Settings.from_env({var: match.group(2)}), name)
            assert parsed == getattr(defaults, name), (var, match.group(2))


# Spaces, ';', '*' and '(' are what a formula holds; compose's interpolation must keep them.
FORMULA = "H=(3*i**2 + 7*i + 11) % 65537; Phi=i**2 + j**2 + 2*j + 25"
COMPOSE_CONFIG = {"docker compose": ["docker", "compose", "-f", str(COMPOSE), "config",
                                     "--format", "json"],
                  "docker-compose": ["docker-compose", "-f", str(COMPOSE), "config"]}


@pytest.mark.parametrize("tool", sorted(COMPOSE_CONFIG))
def test_compose_passes_a_hash_formula_through_unchanged(tool: str) -> None:
    """``<compose> config`` renders the file as the engine gets it (no engine needed)."""
    if shutil.which(tool.split()[0]) is None:
        unavailable(f"{tool} is not installed")
    env = {**os.environ, "LB_HASH": FORMULA, "DOCKER_GID": "0"}
    run = subprocess.run(COMPOSE_CONFIG[tool], capture_output=True, text=True, env=env,
                         timeout=60, check=False)
    if run.returncode != 0 and "is not a docker command" in run.stderr:
        unavailable(f"{tool} is not installed")
    assert run.returncode == 0, run.stderr
    services = yaml.safe_load(run.stdout)["services"]  # JSON is YAML too
    assert {name: s["environment"]["LB_HASH"] for name, s in services.items()} == {
        "lb": FORMULA, "supervisor": FORMULA}


LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_the_readme_is_short_and_every_document_it_links_exists() -> None:
    """The README is what a newcomer reads at once; depth lives in docs/, linked from it."""
    assert len(README.read_text().splitlines()) <= 220
    for doc in [README, *sorted((ROOT / "docs").glob("*.md"))]:
        for target in LINK.findall(doc.read_text()):
            if "://" in target:
                continue
            assert (doc.parent / target).exists(), f"{doc.name} links {target}, which is missing"
    linked = set(LINK.findall(README.read_text()))
    for doc in sorted((ROOT / "docs").glob("*.md")):
        assert f"docs/{doc.name}" in linked, f"docs/{doc.name} is not linked from the README"


def test_project_documents_speak_of_the_project_not_of_issues() -> None:
    for doc in [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "results.md"]:
        assert not re.search(r"\bissue\s*#?\d", doc.read_text(), re.IGNORECASE), doc.name
