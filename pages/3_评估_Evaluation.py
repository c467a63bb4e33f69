"""效果评估: metrics of the served model on the dev file or an uploaded labelled jsonl (model.evaluate)."""

import os
import sys
from pathlib import Path

import streamlit as st

from app_support.evaluation import (
    load_examples,
    per_label_table,
    per_predicate_table,
    summary_json,
    task_counts,
    threshold_table,
    wrong_rows,
)
from app_support.plots import confusion_figure
from app_support.settings import (
    DEV_DATA_PATH,
    HEADLINE_METRICS,
    TRAIN_DATA_PATH,
    format_metric,
    user_message,
    writes_allowed,
)
from app_support.ui import page_setup, require_model
from core.dataset import TRAIN_FILE, DataError, read_jsonl

DEV, UPLOAD = "验证集 dev file", "上传 jsonl upload a jsonl"

model_dir = page_setup("效果评估 Evaluation")
lm = require_model(model_dir)

st.title("效果评估 Evaluation")
st.caption('数据格式与训练相同：每行一个 {"context": ..., "target": ...}。分类看准确率/macro-F1，抽取按 '
           "(subject, predicate, object) 完全匹配计算 P/R/F1。")

source = st.radio("数据 data", [DEV, UPLOAD], horizontal=True)
uploaded = None
if source == DEV:
    st.caption(f"`{DEV_DATA_PATH}`" + ("" if Path(DEV_DATA_PATH).is_file() else " — 不存在 missing: run `make data`"))
else:
    uploaded = st.file_uploader("labelled jsonl", key="eval_upload")
prompts = st.radio("提示 prompts", ["canonical", "data"], horizontal=True,
                   help="canonical: 与应用、model.label 相同的提问 the serving phrasing; "
                        "data: 每行自己的提问 each row's own phrasing (shows how much the wording matters)")
limit = st.number_input("只评估前 N 行 evaluate the first N rows (0 = 全部 all)", min_value=0, value=0, step=10)

if st.button("开始评估 Evaluate", type="primary", disabled=source == UPLOAD and uploaded is None):
    from model.evaluate import evaluate

    try:
        if uploaded is not None:
            examples = load_examples(data=uploaded.getvalue(), name=uploaded.name, limit=int(limit))
        else:
            examples = load_examples(DEV_DATA_PATH, limit=int(limit))
    except DataError as err:
        st.error(f"无法读取数据 cannot read the data: {err}")
        st.stop()
    except OSError as err:  # e.g. a full temp folder while an upload is stored to be read
        st.error(f"无法读取数据 cannot read the data: {user_message(err)}")
        st.stop()
    counts = task_counts(examples)
    bar, status = st.progress(0.0), st.empty()

    def report(done: int, total: int) -> None:
        bar.progress(min(1.0, done / max(1, total)))
        status.caption(f"已评估 evaluated {done} / {total} 行 rows")

    report(0, len(examples))
    try:
        train_file = Path(TRAIN_DATA_PATH)  # the baseline learns from the model's training rows
        baseline_train = read_jsonl(train_file) if train_file.is_file() else None
        metrics = evaluate(lm, examples, on_progress=report, prompts=prompts, baseline_train=baseline_train)
    except Exception as err:  # noqa: BLE001 - a message on the page, not a traceback
        st.error(f"评估失败 evaluation failed: {user_message(err)}")
        st.stop()
    bar.progress(1.0)
    name = uploaded.name if uploaded is not None else DEV_DATA_PATH
    st.session_state["eval_result"] = (name, metrics)

stored = st.session_state.get("eval_result")
if stored:
    name, metrics = stored
    st.subheader(f"结果 Results: {name}")
    st.caption(f"{metrics['n']} 行 rows: {metrics['cls_n']} 分类 classification, {metrics['ie_n']} 抽取 extraction; "
               f"{metrics.get('prompts', 'canonical')} prompts. 严格计分 strict: only answers exactly in the training "
               f"format count; lenient (parser repairs allowed): accuracy "
               f"{format_metric(metrics.get('lenient_cls_accuracy'))}, triple F1 "
               f"{format_metric(metrics.get('lenient_triple_f1'))}; reference spans not in their text: "
               f"{metrics.get('gold_spans_not_in_text', '–')}")
    if metrics.get("baseline_cls_accuracy") is not None:
        st.caption(f"参照 baseline (字符 1-3-gram TF-IDF + logistic regression, trained on {TRAIN_FILE}): category "
                   f"accuracy {format_metric(metrics['baseline_cls_accuracy'])}, macro-F1 "
                   f"{format_metric(metrics.get('baseline_cls_macro_f1'))}")
    first, second = st.columns(4), st.columns(4)
    for column, (key, label) in zip([*first, *second], HEADLINE_METRICS, strict=False):
        column.metric(label, format_metric(metrics.get(key)))

    if metrics["cls_n"]:
        left, right = st.columns(2)
        with left:
            st.pyplot(confusion_figure(metrics["confusion"]))
        with right:
            st.markdown("**各类别 Per label**")
            # st.table, not st.dataframe: a few rows, all columns visible in a half-width column.
            st.table(per_label_table(metrics))
    if metrics["ie_n"]:
        st.markdown("**各关系 Per predicate**")
        st.dataframe(per_predicate_table(metrics), use_container_width=True)

    thresholds = threshold_table(metrics)
    if len(thresholds) > 1:
        st.markdown("**按置信度筛选 At a minimum confidence** (the slider on the other pages, model.label "
                    "--min-confidence): what is kept and how precise it is")
        st.table(thresholds)

    wrong = wrong_rows(metrics)
    st.markdown(f"**错误的行 Wrong rows ({len(wrong)})**")
    st.dataframe(wrong, use_container_width=True)

    summary = summary_json(metrics)
    left, right = st.columns(2)
    left.download_button("下载 metrics.json", summary, file_name="metrics.json", mime="application/json")
    # Visitors cannot change what every other visitor sees unless the server's owner allows it.
    if writes_allowed(sys.argv, os.environ) and right.button(f"保存到模型目录 save as {model_dir / 'metrics.json'}"):
        from model.evaluate import write_outputs

        try:
            write_outputs(metrics, model_dir / "metrics.json")
        except OSError as err:  # a read-only model folder, a full disk
            st.error(f"无法保存 could not save metrics.json: {user_message(err)}")
        else:
            st.success(f"saved {model_dir / 'metrics.json'}; the sidebar shows it from the next page load")
