"""Sphinx configuration: the API reference is built from the package's docstrings."""
project = "hpcckpt"
author = "the hpcckpt developers"
extensions = ["sphinx.ext.autodoc"]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
html_theme = "alabaster"
exclude_patterns = ["_build"]
