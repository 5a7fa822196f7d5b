"""The docs match the code: every configuration key is documented, every CLI command has --help."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from transcribe.cli import COMMANDS, build_parser
from transcribe.config import Config

DOCS = Path(__file__).resolve().parents[1] / "docs"


def config_keys():
    for section, field in Config.model_fields.items():
        if section == "base_dir":
            continue
        for key in field.annotation.model_fields:
            yield f"{section}.{key}"


def test_every_config_key_is_documented():
    text = (DOCS / "configuration.md").read_text()
    missing = [k for k in config_keys() if f"`{k}`" not in text]
    assert missing == []


def test_readme_links_resolve():
    readme = (DOCS.parent / "README.md").read_text()
    for link in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (DOCS.parent / link).is_file(), link


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_each_command_explains_itself(command):
    out = subprocess.run([sys.executable, "-m", "transcribe", command, "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "usage: transcribe" in out.stdout and len(out.stdout) > 200


def test_top_level_help_lists_commands():
    text = build_parser().format_help()
    assert all(c in text for c in COMMANDS)
