"""Helpers for the Streamlit pages (app.py, pages/*.py).

Pages stay thin: they lay out widgets and call these helpers, which call `model/`. Modules here
that do not import streamlit (highlight, fonts, runs, plots, batch, evaluation, settings) are
unit-tested in tests/app/; `ui` holds the few pieces that need a Streamlit session.
"""

import warnings

# transformers 4.33 (pinned for ChatGLM-6B's code) calls a torch helper that torch 2.13 deprecates; every
# command printed the FutureWarning on import. It is about transformers' internals, nothing a user can act on.
warnings.filterwarnings("ignore", message=r".*_register_pytree_node.* is deprecated", category=FutureWarning)
