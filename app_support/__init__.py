"""Helpers for the Streamlit pages (app.py, pages/*.py).

Pages stay thin: they lay out widgets and call these helpers, which call `model/`. Modules here
that do not import streamlit (highlight, fonts, runs, plots, batch, evaluation, settings, uploads) are
unit-tested in tests/app_support/; `ui` holds the few pieces that need a Streamlit session.
"""

import core  # noqa: F401 - installs core's warning filter before any command imports transformers
