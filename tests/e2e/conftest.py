"""Browser-test fixtures: a Streamlit server on the session's tiny merged model, and Debian chromium.

The server runs as a real subprocess (`streamlit run app.py -- --model DIR`) on a free port, its
stderr captured to a file so tests can count how often the model was loaded.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.streamlit_server import CHROMIUM, CHROMIUM_ARGS, VIEWPORT, Server, start_server, stop_server


@pytest.fixture(scope="session")
def app_model(request) -> Path:
    """The session's tiny merged model, or E2E_MODEL_DIR (an existing merged model) to skip building it."""
    given = os.environ.get("E2E_MODEL_DIR")
    return Path(given) if given else request.getfixturevalue("merged_model")


@pytest.fixture(scope="session")
def server(app_model, tmp_path_factory) -> Iterator[Server]:
    running = start_server(app_model, tmp_path_factory.mktemp("streamlit"))
    yield running
    stop_server(running)


@pytest.fixture(scope="session")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} missing: apt-get install -y chromium fonts-noto-cjk (make system-deps)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport=VIEWPORT, accept_downloads=True)
    context.set_default_timeout(60_000)
    yield context.new_page()
    context.close()


@pytest.fixture(scope="session")
def direct_model(app_model):
    """The same merged model loaded in the test process, to compare the app's answers with predict()."""
    from model.load import load_merged

    return load_merged(app_model)
