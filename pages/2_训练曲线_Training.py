"""训练曲线: train and eval loss of one or several runs (runs/*/train_log.jsonl), with their configs."""

from pathlib import Path

import pandas as pd
import streamlit as st

from app_support.fonts import cjk_font_name
from app_support.plots import loss_figure
from app_support.runs import config_table, discover_runs, read_log, read_train_config, summary
from app_support.settings import user_message
from app_support.ui import get_model, page_setup, show_demo_banner, sidebar

model_dir = page_setup("训练曲线 Training curves")
# This page works without a model: the sidebar just says there is none.
lm, error = get_model(model_dir)
sidebar(model_dir, lm, error)
show_demo_banner(model_dir, lm)

st.title("训练曲线 Training curves")
# runs/ and the served model's own runs folder (runs/NAME/merged -> runs/), which may lie elsewhere.
roots = [Path("runs")] + ([model_dir.parent.parent] if model_dir.name == "merged" else [])
try:
    runs = discover_runs(roots)
except OSError as err:  # an unreadable runs folder: one line, no server paths
    st.error(f"无法读取训练记录 cannot read the runs: {user_message(err)}")
    st.stop()
if not runs:
    st.info("还没有训练记录 no runs yet: no runs/*/train_log.jsonl. Train one with "
            "`python -m finetune.train ... --output-dir runs/NAME` or `make demo`.")
    st.stop()

by_name = {run.name: run for run in runs}
own = model_dir.parent.resolve()
default = [run.name for run in runs if run.path.resolve() == own] or [runs[0].name]
chosen = st.multiselect("训练运行 runs (叠加显示 overlaid)", list(by_name), default=default)
if not chosen:
    st.info("请选择至少一个运行 choose at least one run")
    st.stop()

try:
    logs = {name: read_log(by_name[name].log_path) for name in chosen}
    configs = {name: read_train_config(by_name[name].path) for name in chosen}
except OSError as err:
    st.error(f"无法读取训练记录 cannot read the runs: {user_message(err)}")
    st.stop()
left, right = st.columns([3, 2])
with left:
    st.pyplot(loss_figure(logs))
    if cjk_font_name() is None:
        st.caption("没有找到中文字体 no CJK font found: install fonts-noto-cjk for Chinese plot labels")
with right:
    st.markdown("**训练配置 train_config.json**")
    st.table(pd.DataFrame(config_table(configs)))
# Full width: the summary has a column per logged quantity, the sample-decode rates included.
st.markdown("**摘要 summary** (sample_*: 每次评估后抽样解码的可解析率 / 正确率 parse and correct rates of the dev rows "
            "decoded after the last evaluation)")
st.dataframe(pd.DataFrame([{"run": name, **summary(records)} for name, records in logs.items()]),
             use_container_width=True)
for name in chosen:
    with st.expander(f"{name}: train_config.json (全部 all fields)"):
        if configs[name] is None:
            st.caption("没有 train_config.json")
        else:
            st.json(configs[name])
