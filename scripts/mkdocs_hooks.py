"""MkDocs hooks for the mspec documentation site (``mkdocs.yml``: ``hooks``).

* ``docs/reliability.md`` is written by the reliability work; until it exists its navigation
  entry is dropped and links to it are shown as plain text, with an info message, instead of
  failing the strict build. Every other missing page or link is still an error.
* A page added to ``docs/`` but not yet listed in ``mkdocs.yml``'s ``nav`` is appended to a
  "More" section (info message), so a new page is always reachable and never breaks the
  build; list it in ``nav`` at its proper place.
* Prose like ``[M/H] [-0.85, 0.35]`` (a bracketed label followed by an interval) is Markdown's
  reference-link syntax, which mkdocs-autorefs reports as a missing cross-reference; the
  second bracket is escaped when its content cannot be a link target (it holds a comma and
  a space), outside code.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

log = logging.getLogger("mkdocs.hooks.mspec")

#: Pages that may not exist yet (written by other work); any other missing page fails.
OPTIONAL_PAGES = {"reliability.md"}


def _prune(nav, docs_dir: Path):
    out = []
    for item in nav:
        if isinstance(item, dict):
            ((title, value),) = item.items()
            if isinstance(value, list):
                out.append({title: _prune(value, docs_dir)})
                continue
            page = value
        else:
            page, title = item, None
        if isinstance(page, str) and page in OPTIONAL_PAGES and not (docs_dir / page).exists():
            log.info("docs/%s does not exist yet: left out of the navigation", page)
            continue
        out.append(item)
    return out


def _listed(nav) -> set[str]:
    out = set()
    for item in nav:
        value = next(iter(item.values())) if isinstance(item, dict) else item
        if isinstance(value, list):
            out |= _listed(value)
        elif isinstance(value, str):
            out.add(value)
    return out


def on_config(config, **kwargs):
    """Drop entries of optional pages not written yet; append unlisted pages under "More"."""
    if not config.get("nav"):
        return config
    docs = Path(config["docs_dir"])
    nav = _prune(config["nav"], docs)
    listed = _listed(nav)
    extra = sorted(
        p.relative_to(docs).as_posix()
        for p in docs.rglob("*.md")
        if not any(part.startswith((".", "_")) for part in p.relative_to(docs).parts)
    )
    extra = [p for p in extra if p not in listed]
    if extra:
        log.info("pages not in mkdocs.yml's nav, listed under 'More': %s", ", ".join(extra))
        nav.append({"More": extra})
    config["nav"] = nav
    return config


_INTERVAL = re.compile(r"(\]\s?)\[([^\]\[`]*, [^\]\[`]*)\]")


def _escape_intervals(markdown: str) -> str:
    out, fenced = [], False
    for line in markdown.split("\n"):
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
        elif not fenced and ("] [" in line or "][" in line):
            parts = line.split("`")
            parts[::2] = [_INTERVAL.sub(r"\1\\[\2]", p) for p in parts[::2]]
            line = "`".join(parts)
        out.append(line)
    return "\n".join(out)


def on_page_markdown(markdown, page, config, files, **kwargs):
    """Escape prose intervals after a bracket; links to unwritten optional pages become text."""
    markdown = _escape_intervals(markdown)
    docs = Path(config["docs_dir"])
    for name in OPTIONAL_PAGES:
        if (docs / name).exists():
            continue
        pattern = re.compile(r"\[([^\]]+)\]\((?:\./)?" + re.escape(name) + r"(?:#[^)]*)?\)")
        markdown, n = pattern.subn(r"\1", markdown)
        if n:
            log.info(
                "%s: %d link(s) to %s (not written yet) shown as text", page.file.src_uri, n, name
            )
    return markdown
