"""Sphinx configuration: the API reference is built from the package's docstrings."""
project = "hpcckpt"
author = "the hpcckpt developers"
extensions = ["sphinx.ext.autodoc"]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_class_signature = "separated"   # a class heading shows no internal constructor (Heap: create/open)
autodoc_default_options = {"exclude-members": "__init__, __new__"}
html_theme = "alabaster"
exclude_patterns = ["_build"]
