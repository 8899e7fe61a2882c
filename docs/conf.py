"""Sphinx configuration of the sklearn_craft documentation."""

import sklearn_craft

project = "sklearn_craft"
author = "sklearn_craft developers"
release = sklearn_craft.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "numpydoc",
]
autosummary_generate = True
# The metadata-routing setters scikit-learn generates are not part of our API.
autodoc_default_options = {
    "members": True,
    "inherited-members": False,
    "exclude-members": "set_fit_request, set_partial_fit_request, set_score_request, set_predict_request, set_transform_request",
}
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
exclude_patterns = ["_build"]
html_theme = "alabaster"
html_static_path = ["_static"]
