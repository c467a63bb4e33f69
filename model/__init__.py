"""Serving a merged model: load, predict with constrained decoding, parse, evaluate, label CSV files."""

import core  # noqa: F401 - installs core's warning filter before any command imports transformers
