"""The app's home page answers a comment in a real browser with each ChatGLM double's merged model,
loaded through trust_remote_code as a user's merged ChatGLM directory is."""

from __future__ import annotations

import pytest

from tests.e2e.streamlit_server import start_server, stop_server
from tests.e2e.test_app_browser import COMMENTS, direct, label_comment, no_exception, open_page, shown_result

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("kind", ["chatglm_v1", "chatglm2"])
def test_home_labels_a_comment_with_a_chatglm_model(kind, page, double_merged, tmp_path):
    from model.load import load_merged

    merged = double_merged(kind)
    server = start_server(merged, tmp_path)
    try:
        open_page(page, server)
        label_comment(page, COMMENTS[1])
        category, triples = shown_result(page)
        lm = load_merged(merged, device="cpu")
        assert category in lm.schema["labels"]
        assert (category, triples) == direct(lm, COMMENTS[1])
        no_exception(page)
    finally:
        stop_server(server)
