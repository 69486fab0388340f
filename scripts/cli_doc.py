"""Write docs/cli.md, every `kdtargets` and `kdtrain` option with its default and help, from the CLIs themselves.

python scripts/cli_doc.py            # rewrite docs/cli.md
python scripts/cli_doc.py --check    # exit 1 if docs/cli.md is out of date (a test runs this)
"""

from __future__ import annotations

import sys
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "cli.md"


def render() -> str:
    import typer.main

    from ar2mdm.precompute.cli import app as kdtargets
    from ar2mdm.train.cli import app as kdtrain

    out = [
        "# Command-line reference",
        "",
        "Generated from the CLIs' own help by `python scripts/cli_doc.py`; `kdtargets COMMAND --help` says the same.",
        "",
    ]
    for name, app in (("kdtargets", kdtargets), ("kdtrain", kdtrain)):
        group = typer.main.get_command(app)
        for cmd_name, cmd in group.commands.items():
            out += [f"## `{name} {cmd_name}`", "", (cmd.help or "").strip().splitlines()[0], ""]
            out += ["| argument / option | default | what |", "| --- | --- | --- |"]
            for p in cmd.params:
                if p.name == "help":
                    continue
                flag = (
                    " / ".join(f"`{o}`" for o in [*p.opts, *p.secondary_opts])
                    if p.param_type_name == "option"
                    else f"`{p.name.upper()}`"
                )
                default = "" if p.default is None or p.required else f"`{p.default}`"
                text = (getattr(p, "help", None) or "").replace("|", "\\|").replace("\n", " ")
                out.append(f"| {flag} | {default} | {text} |")
            out.append("")
    return "\n".join(out)


def main() -> None:
    text = render()
    if "--check" in sys.argv:
        if not DOC.exists() or DOC.read_text() != text:
            sys.exit(f"{DOC} is out of date: run python scripts/cli_doc.py")
        return
    DOC.write_text(text)
    print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
