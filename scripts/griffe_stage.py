"""Griffe extensions for the documentation site: stage signatures and Sphinx roles.

A function declared with ``@stage(...)`` (:func:`mspec.stage.stage`) returns its outputs only;
the decorator's wrapper adds the keyword-only ``merge: bool = True`` of the stage contract.
Griffe reads the source, so without this extension the signatures on the site would lack
``merge`` and the numpydoc ``merge`` parameter documented by every stage would be reported as
unknown. The docstrings also use Sphinx roles (``:func:`preprocess` ``), which Markdown would
show verbatim; :class:`SphinxRoles` turns them into inline code. Used by ``mkdocs.yml``
(mkdocstrings ``extensions``).
"""

from __future__ import annotations

import ast
import re

import griffe


def _is_stage_decorator(dec: ast.expr) -> bool:
    target = dec.func if isinstance(dec, ast.Call) else dec
    if isinstance(target, ast.Name):
        return target.id == "stage"
    if isinstance(target, ast.Attribute):
        return target.attr == "stage"
    return False


class StageMerge(griffe.Extension):
    """Add ``merge: bool = True`` (keyword-only) to functions declared with ``@stage``."""

    def on_function_instance(self, *, node, func, agent, **kwargs) -> None:
        decorators = getattr(node, "decorator_list", [])
        if not any(_is_stage_decorator(d) for d in decorators) or "merge" in func.parameters:
            return
        merge = griffe.Parameter(
            "merge", annotation="bool", kind=griffe.ParameterKind.keyword_only, default="True"
        )
        params = list(func.parameters)
        at = next(
            (i for i, p in enumerate(params) if p.kind is griffe.ParameterKind.var_keyword),
            len(params),
        )
        params.insert(at, merge)
        func.parameters = griffe.Parameters(*params)


_ROLE = re.compile(r":(?:py:)?(?:func|meth|class|mod|attr|data|obj|exc|const):`~?([^`]+)`")


class SphinxRoles(griffe.Extension):
    """Render Sphinx cross-reference roles in docstrings as inline code."""

    def on_object(self, *, obj, **kwargs) -> None:
        doc = obj.docstring
        if doc is not None and ":" in doc.value:
            doc.value = _ROLE.sub(lambda m: f"`{m.group(1)}`", doc.value)
