"""Every YAML example of docs/definitions.md loads as the doc says.

A ``<!-- check: MODE -->`` comment precedes each example. MODE is ``alone``, ``with demo
project.yaml`` or ``with demo definitions`` (the demo files the example goes with), prefixed with
``refused`` when the example is refused with the ``console`` output that follows it.
``<!-- file: NAME -->`` before a block writes it as NAME next to the next example (an .avsc file).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from featurestream.definitions.errors import DefinitionError
from featurestream.definitions.loader import load_project

ROOT = Path(__file__).resolve().parents[3]
DOC = (ROOT / "docs" / "definitions.md").read_text(encoding="utf-8")
DEMO = ROOT / "definitions"
DEMO_FILES = {"alone": [], "with demo project.yaml": ["project.yaml"], "with demo definitions": ["*.yaml"]}

MARKER = re.compile(
    r"<!-- (?P<kind>check|file): (?P<arg>[^>]*?) -->\n```\w*\n(?P<body>.*?)```"
    r"(?:\s*```console\n(?P<console>.*?)```)?",
    re.S,
)


def examples() -> list[pytest.ParameterSet]:
    """(mode, yaml, extra files, console output) of every checked example, named by its line."""
    found, files = [], {}
    for match in MARKER.finditer(DOC):
        if match["kind"] == "file":
            files[match["arg"]] = match["body"]
        else:
            line = DOC.count("\n", 0, match.start()) + 1
            found.append(
                pytest.param(match["arg"], match["body"], files, match["console"], id=f"line {line}")
            )
            files = {}
    return found


EXAMPLES = examples()


def test_every_yaml_block_is_checked() -> None:
    assert len(EXAMPLES) == DOC.count("```yaml\n")


@pytest.mark.parametrize(("mode", "yaml", "files", "console"), EXAMPLES)
def test_doc_example(
    tmp_path: Path, mode: str, yaml: str, files: dict[str, str], console: str | None
) -> None:
    refused = mode.startswith("refused ")
    defs = tmp_path / "defs"
    defs.mkdir()
    for pattern in DEMO_FILES[mode.removeprefix("refused ")]:
        for demo_file in DEMO.glob(pattern):
            shutil.copy(demo_file, defs)
    for name, text in {**files, "example.yaml": yaml}.items():
        (defs / name).parent.mkdir(parents=True, exist_ok=True)
        (defs / name).write_text(text, encoding="utf-8")

    if not refused:
        load_project(defs)
        return
    assert console is not None, "a refused example needs the console output after it"
    with pytest.raises(DefinitionError) as info:
        load_project(defs)
    shown = console.splitlines()
    assert shown[0] == "$ featurestream plan defs"
    assert shown[1:] == ("error: " + str(info.value).replace(f"{tmp_path}/", "")).splitlines()
