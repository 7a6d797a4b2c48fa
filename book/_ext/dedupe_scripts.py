"""Drop duplicate <script> entries from every page.

sphinx-thebe 0.3.1 (always loaded by Jupyter Book 1) registers an inline script that declares
``const THEBE_JS_URL = ...``; with Sphinx 7.4 it ends up twice in every page's <head>, and the
second copy throws "Identifier 'THEBE_JS_URL' has already been declared" in every reader's browser
console (caught by tests/test_browser.py). This keeps the first of identical script entries.
"""

from __future__ import annotations


def _dedupe(app, pagename, templatename, context, doctree) -> None:
    scripts = context.get("script_files")
    if not scripts:
        return
    seen, unique = set(), []
    for js in scripts:
        # same file and attributes (an inline script's body is an attribute); priority may differ
        key = (str(getattr(js, "filename", js) or ""),  # None and "" both mean "inline"
               tuple(sorted((k, str(v)) for k, v in (getattr(js, "attributes", None) or {}).items())))
        if key in seen:
            continue
        seen.add(key)
        unique.append(js)
    context["script_files"] = unique  # a new list: the builder's own list is reset per page anyway


def setup(app):
    app.connect("html-page-context", _dedupe, priority=999)  # after every other handler
    return {"parallel_read_safe": True, "parallel_write_safe": True}
