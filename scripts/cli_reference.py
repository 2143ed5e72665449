"""docs/cli.md rendered from the click commands themselves: each command's usage, its help text
(what ``--help`` prints) and a table of every option with its default (an option's bounds, from the
configs, are in its help).

    python scripts/cli_reference.py          # write docs/cli.md
    python scripts/cli_reference.py --check  # exit 1 when docs/cli.md is not the rendering

tests/test_cli.py checks that the committed page is the rendering, so an option added to a
command without help, or a page edited by hand, fails the suite.
"""
from __future__ import annotations

import inspect
import re
import sys
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "cli.md"
DEFAULT_IN_HELP = re.compile(r"\s*\[([^\[\]]+)\]\.?$")  # "... [all]." : a default said in the help text


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _spelling(p: click.Option) -> str:
    names = ", ".join(p.opts + p.secondary_opts)
    if p.is_flag:
        return names
    if isinstance(p.type, click.Choice):
        return f"{names} {'|'.join(map(str, p.type.choices))}"
    if p.metavar:
        return f"{names} {p.metavar}"
    kind = {click.INT: "N", click.FLOAT: "X"}.get(p.type, "PATH" if isinstance(p.type, click.Path) else "TEXT")
    return f"{names} {kind}"


def _row(p: click.Option) -> tuple[str, str, str]:
    help_text = inspect.cleandoc(p.help or "")
    said = DEFAULT_IN_HELP.search(help_text)
    if p.is_flag:
        default = "off"
    elif p.required:
        default = "required"
    elif p.show_default and p.default is not None:
        default = str(p.default)
    elif said:
        default = said.group(1)
    else:
        return f"`{_spelling(p)}`", "—", _with_env(p, help_text)
    if said and not (p.show_default and p.default is not None):
        help_text = help_text[: said.start()] + "."
    return f"`{_spelling(p)}`", default if default in ("off", "required") else f"`{default}`", _with_env(p, help_text)


def _with_env(p: click.Option, help_text: str) -> str:
    """The help text, naming the environment variable that sets the option when the help does not already."""
    if p.envvar and "Env:" not in help_text:
        help_text += f" Env: {p.envvar}."
    return help_text


def _help_markdown(text: str) -> list[str]:
    """A click help text as markdown: paragraphs kept, each ``\\b`` block (examples) as a code block."""
    out: list[str] = []
    for para in re.split(r"\n\s*\n", inspect.cleandoc(text)):
        lines = para.splitlines()
        if lines and lines[0].strip() == "\b":
            body = lines[1:]
            fence = "```"
            if body and body[0].strip() in ("Example:", "Examples:"):
                out += [body[0].strip(), ""]
                body, fence = body[1:], "```bash"
            out += [fence, *[ln.strip() for ln in body], "```", ""]
        else:
            out += [" ".join(ln.strip() for ln in lines), ""]
    return out


def _options_table(params) -> list[str]:
    rows = [_row(p) for p in params if isinstance(p, click.Option) and p.name != "help"]
    out = ["| option | default | meaning |", "| --- | --- | --- |"]
    out += [f"| {_cell(a)} | {_cell(b)} | {_cell(c)} |" for a, b, c in rows]
    return out + [""]


def render(group: click.Group | None = None) -> str:
    """The page for ``group`` (default: the ``pipe`` command)."""
    if group is None:
        from cli.main import main as group
    ctx = click.Context(group, info_name="pipe")
    out = ["# The `pipe` command", "",
           "<!-- rendered by `python scripts/cli_reference.py` from the click commands; edit their help there, not here -->", ""]
    out += _help_markdown(group.help or "")
    out += ["Usage: `pipe [GLOBAL OPTIONS] COMMAND ...`; every command also has `--help`.", "", "Global options:", ""]
    out += _options_table(group.params)
    for name in group.commands:  # in the order they are defined: the order of the work
        cmd = group.get_command(ctx, name)
        sub = click.Context(cmd, info_name=name, parent=ctx)
        usage = " ".join(cmd.collect_usage_pieces(sub))
        out += [f"## `pipe {name} {usage}`", ""]
        out += _help_markdown(cmd.help or "")
        out += _options_table(cmd.params)
    return "\n".join(out).rstrip() + "\n"


def undocumented(group: click.Group | None = None) -> list[str]:
    """Options of any command (or the group) without help text: ``command --option``."""
    if group is None:
        from cli.main import main as group
    ctx = click.Context(group, info_name="pipe")
    cmds = [("pipe", group)] + [(n, group.get_command(ctx, n)) for n in group.list_commands(ctx)]
    return [f"{n} {p.opts[0]}" for n, c in cmds for p in c.params
            if isinstance(p, click.Option) and p.name != "help" and not (p.help or "").strip()]


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    page = render()
    if "--check" in sys.argv[1:]:
        if PAGE.read_text() != page:
            print(f"{PAGE} is not the rendering of the click commands: run python scripts/cli_reference.py", file=sys.stderr)
            sys.exit(1)
        sys.exit(0)
    PAGE.write_text(page)
    print(f"wrote {PAGE} ({page.count(chr(10))} lines)")
