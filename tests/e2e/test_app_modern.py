"""The app's home page answers a comment in a real browser with each modern-lane family's merged model
(Qwen2, Qwen3, GLM, GLM-4-0414 tiny models, transformers' own code)."""

from __future__ import annotations

import pytest

from tests.conftest import MODERN_ARCHS
from tests.e2e.test_app_browser import assert_home_answers_like_predict

pytestmark = [pytest.mark.e2e, pytest.mark.modern_lane]


@pytest.mark.parametrize("arch", MODERN_ARCHS)
def test_home_labels_a_comment_with_a_modern_model(arch, page, modern_merged, tmp_path):
    assert_home_answers_like_predict(page, modern_merged(arch), tmp_path)
