"""The app's home page answers a comment in a real browser with each ChatGLM double's merged model,
loaded through trust_remote_code as a user's merged ChatGLM directory is."""

from __future__ import annotations

import pytest

from tests.e2e.test_app_browser import assert_home_answers_like_predict

pytestmark = [pytest.mark.e2e, pytest.mark.legacy_lane]


@pytest.mark.parametrize("kind", ["chatglm_v1", "chatglm2"])
def test_home_labels_a_comment_with_a_chatglm_model(kind, page, double_merged, tmp_path):
    assert_home_answers_like_predict(page, double_merged(kind), tmp_path)
