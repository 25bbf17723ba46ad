"""Help texts built from the registries (probes, outputs, data specs), so `--help` lists what exists."""

from __future__ import annotations

import argparse
import re
import textwrap

from ..engine.probes import list_probes


def _first_sentence(doc: str | None) -> str:
    """The first sentence of a docstring, its lines joined (help texts show it whole, never cut)."""
    para = " ".join((doc or "").strip().split("\n\n")[0].split())
    m = re.search(r"(?<=[.!?])\s+(?=[A-Z`(])", para)
    return para[: m.start()] if m else para


def _listing(title: str, entries: dict[str, str]) -> str:
    """`title:` then one wrapped, indented paragraph per entry (for a help epilog)."""
    import shutil

    width = max(40, min(100, shutil.get_terminal_size().columns - 2))
    lines = [f"{title}:"]
    for name, text in entries.items():
        lines.append(textwrap.fill(f"{name}: {text}", width, initial_indent="  ", subsequent_indent="      ",
                                   break_on_hyphens=False))
    return "\n".join(lines)


def _probe_help() -> dict[str, str]:
    from ..engine.probes import PROBES

    needs = {"reinit": " Needs --reference.", "interpolate": " Needs --reference; --alpha, --sigma set α and σ."}
    return {name: _first_sentence(PROBES.get(name).__doc__) + needs.get(name, "") for name in list_probes()}


def _finish_help(sub) -> None:
    """Every command gets a description, and commands taking data or probes list every data spec and probe."""
    from ..data import SPECS

    helps = {a.dest: a.help for a in sub._choices_actions}
    for name, p in sub.choices.items():
        p.formatter_class = argparse.RawDescriptionHelpFormatter  # keep the listings' lines; options still wrap
        if p.description is None:
            text = helps.get(name) or name
            p.description = text[0].upper() + text[1:] + "."
        options = {o for a in p._actions for o in a.option_strings}
        epilog = [p.epilog] if p.epilog else []
        if "--probe" in options and name == "measure":
            epilog.append(_listing("probes", _probe_help()))
        if options & {"--data", "--test-data"}:
            epilog.append(_listing("data specs", SPECS))
        p.epilog = "\n\n".join(epilog) or None
