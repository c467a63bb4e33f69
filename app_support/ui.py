"""The Streamlit pieces every page shares: page setup, the one model per process, the sidebar."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

# The app never downloads: a wrong --model must fail fast, not retry the hub for minutes.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import streamlit as st  # noqa: E402

from app_support.settings import (  # noqa: E402
    demo_banner,
    headline_metrics,
    model_dir_from_argv,
    model_summary,
    read_metrics,
    setup_commands,
)


@st.experimental_singleton(show_spinner="加载模型 loading the model (once per server)...")
def _load_model(path: str):
    """One LoadedModel per server process, shared by every session and page.

    Sessions run in their own threads; LoadedModel.lock serialises generate. A failed load raises,
    and Streamlit does not cache exceptions, so a model made later is picked up on the next rerun.
    """
    from model.load import load_merged

    return load_merged(path)


# A local PNG, not an emoji: Streamlit 1.17 turns an emoji favicon into an image URL on a CDN, which an
# offline server's visitors cannot reach (and every page view asked for it).
ICON = Path(__file__).resolve().parents[1] / "assets" / "icon.png"


def page_setup(title: str) -> Path:
    """set_page_config (must be the first st call of a page) and the model dir from the command line."""
    st.set_page_config(page_title=title, page_icon=str(ICON) if ICON.is_file() else None, layout="wide")
    st.markdown(HOME_NAV_CSS, unsafe_allow_html=True)
    return model_dir_from_argv(sys.argv)


# Streamlit 1.17 names the main page after its script ("app"); the other pages are named bilingually by
# their file names (pages/1_批量标注_Batch.py). Renaming app.py would change the command every user runs, so
# the home entry of the sidebar is relabelled in CSS; its URL stays "/".
HOME_NAV_CSS = """<style>
[data-testid="stSidebarNav"] li:first-child a span { font-size: 0; }
[data-testid="stSidebarNav"] li:first-child a span::after { content: "单条标注 Comment"; font-size: 1rem; }
</style>"""


# Streamlit 1.17's singleton lets two sessions run the loader at once on a fresh server, and importing
# transformers from two threads at once fails in one of them ("cannot import name 'PretrainedConfig'"),
# so that visitor was told there is no model. One load at a time; the second then finds it cached.
# This module is imported once per process (pages are re-run, imports are not), so the lock is shared.
_LOAD_LOCK = threading.Lock()


def get_model(model_dir: Path):
    """(LoadedModel, None) or (None, user-facing reason); never raises into the page."""
    from model.load import ModelLoadError

    try:
        with _LOAD_LOCK:
            return _load_model(str(model_dir.resolve())), None
    except ModelLoadError as err:
        return None, str(err)
    except Exception as err:  # noqa: BLE001 - e.g. out of memory: a message, not a traceback
        return None, f"could not load {model_dir}: {type(err).__name__}: {err}"


def sidebar(model_dir: Path, lm, error: str | None) -> None:
    """Model facts and, if model.evaluate wrote DIR/metrics.json, its headline metrics."""
    with st.sidebar:
        st.subheader("模型 Model")
        if lm is None:
            st.caption(f"路径 path: `{model_dir}`")
            st.warning("没有可用的模型 no model loaded")
            return
        info = lm.info()
        info["path"] = str(model_dir)
        rows = model_summary(info)
        for name, value in rows[:5]:
            st.markdown(f"**{name}**: `{value}`")
        with st.expander(rows[5][0]):
            st.write(rows[5][1])
        with st.expander(rows[6][0]):
            st.write(rows[6][1])
        metrics = read_metrics(model_dir)
        if metrics:
            st.subheader("评估 Metrics")
            st.caption(f"{model_dir / 'metrics.json'} (n={metrics.get('n', '?')})")
            for label, value in headline_metrics(metrics):
                st.markdown(f"{label}: **{value}**")
        else:
            st.caption("没有 metrics.json: 在「效果评估」页评估，或运行 python -m model.evaluate")


def show_demo_banner(model_dir: Path, lm) -> None:
    """One line at the top of every page when the model is the CPU demo's toy."""
    line = demo_banner(lm.schema, lm.n_params, read_metrics(model_dir)) if lm is not None else None
    if line:
        st.warning(line)


def show_no_model(model_dir: Path, error: str) -> None:
    st.error(f"没有可用的模型 No model to serve: {error}")
    st.markdown("先生成一个模型，然后刷新本页。 Make one with these commands, then reload this page:")
    st.code("\n".join(setup_commands(model_dir)), language="bash")


def require_model(model_dir: Path):
    """The loaded model, after drawing the sidebar; without one, explain how to make it and stop the page."""
    lm, error = get_model(model_dir)
    sidebar(model_dir, lm, error)
    show_demo_banner(model_dir, lm)
    if lm is None:
        show_no_model(model_dir, error or "unknown error")
        st.stop()
    return lm


def confidence_slider(key: str) -> float:
    """The minimum confidence a triple needs to be shown or written (0: keep every triple)."""
    return st.slider(
        "三元组最低置信度 minimum triple confidence", min_value=0.0, max_value=1.0, value=0.0, step=0.05, key=key,
        help="置信度 = 模型在约束下给出该三元组的概率 (model.confidence)。0 保留全部。"
             " The model's own probability of the triple under the constraint; 0 keeps them all.",
    )
