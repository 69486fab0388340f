"""The generated CLI reference matches the CLIs, and the README's links point at files that exist."""

import re
import runpy
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_docs_cli_md_is_generated_from_the_current_clis():
    render = runpy.run_path(str(REPO / "scripts" / "cli_doc.py"))["render"]
    assert (REPO / "docs" / "cli.md").read_text() == render(), "run python scripts/cli_doc.py"


def test_every_relative_link_of_the_readme_and_docs_exists():
    for page in [REPO / "README.md", *(REPO / "docs").glob("*.md")]:
        for target in re.findall(r"\]\(([^)#]+)\)", page.read_text()):
            if "://" not in target:
                assert (page.parent / target).exists(), f"{page.name} links {target}"
