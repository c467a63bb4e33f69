"""批量标注: upload a CSV, label every row with model.label, download the labelled CSV."""

from pathlib import Path

import streamlit as st

from app_support.batch import (
    check_upload,
    download_name,
    encoding_label,
    label_upload,
    preview_and_failures,
    size_problem,
)
from app_support.settings import MAX_UPLOAD_MB, user_message
from app_support.ui import confidence_slider, page_setup, require_model
from model.csv_file import OUTPUT_COLUMNS, TEXT_COLUMN_NAMES, LabelError

SAMPLE_CSV = Path(__file__).resolve().parents[1] / "assets" / "sample_comments.csv"
CHOOSE = "— 请选择文本列 choose the text column —"

model_dir = page_setup("批量标注 Batch labelling")
lm = require_model(model_dir)

st.title("批量标注 Batch labelling")
st.caption(
    f"上传 CSV (UTF-8、带 BOM 的 UTF-8 或 GBK，最大 {MAX_UPLOAD_MB} MB)。文本列按列名自动识别 "
    f"({', '.join(TEXT_COLUMN_NAMES)})，也可手动选择。结果保留原有列并追加 {', '.join(OUTPUT_COLUMNS)}。"
)
if SAMPLE_CSV.is_file():
    st.download_button("下载示例 CSV sample CSV", SAMPLE_CSV.read_bytes(), file_name=SAMPLE_CSV.name, mime="text/csv")

# No type= filter: the browser's own refusal is a terse message; model.label checks the bytes instead.
uploaded = st.file_uploader("上传 CSV upload a CSV file", key="batch_upload")
if uploaded is None:
    st.info("请上传一个 CSV 文件 please upload a CSV file")
    st.stop()

too_big = size_problem(uploaded.size, MAX_UPLOAD_MB)
if too_big:
    st.error(too_big)
    st.stop()

# Check a file once, not on every rerun (a widget click reruns the whole script).
if st.session_state.get("batch_checked", (None,))[0] != uploaded.id:
    try:
        checked = check_upload(uploaded.name, uploaded.getvalue())
    except LabelError as err:
        checked = str(err)
    except OSError as err:  # the temp folder vanished or filled up while the file was read back
        checked = user_message(err)
    st.session_state["batch_checked"] = (uploaded.id, checked)
    st.session_state.pop("batch_result", None)
upload = st.session_state["batch_checked"][1]
if isinstance(upload, str):
    st.error(f"无法使用这个文件 cannot use this file: {upload}")
    st.stop()

st.write(f"**{uploaded.name}**: {encoding_label(upload.source.encoding)}, 约 about {upload.estimated_rows} 行 rows, "
         f"列 columns: {', '.join(upload.header)}")
if upload.guessed_column is None:
    st.warning(
        "没有找到文本列 no text column found: no column is named "
        f"{', '.join(TEXT_COLUMN_NAMES)}. 请选择包含评论文本的列 choose the column that holds the text."
    )
    options, index = [CHOOSE, *upload.header], 0
else:
    options, index = upload.header, upload.header.index(upload.guessed_column)
column = st.selectbox("文本列 text column", options, index=index, key=f"column-{uploaded.id}")
min_confidence = confidence_slider("batch_min_confidence")

if st.button("开始标注 Label the file", type="primary", disabled=column == CHOOSE):
    from model.predict import predict

    bar, status = st.progress(0.0), st.empty()

    def report(done: int, total: int) -> None:
        bar.progress(min(1.0, done / max(1, total)))
        status.caption(f"已标注 labelled {done} / {total} 行 rows")

    try:
        result = label_upload(
            upload, uploaded.getvalue(), column, str(model_dir),
            lambda texts, on_progress: predict(lm, texts, on_progress=on_progress),
            report,
            min_confidence=min_confidence,
        )
    except LabelError as err:
        st.error(f"无法标注 cannot label this file: {err}")
        st.stop()
    except Exception as err:  # noqa: BLE001 - e.g. a full disk: a message on the page, not a traceback
        st.error(f"标注失败 labelling failed: {user_message(err)}")
        st.stop()
    bar.progress(1.0)
    st.session_state["batch_result"] = (uploaded.id, result)

stored = st.session_state.get("batch_result")
if stored and stored[0] == uploaded.id:
    result = stored[1]
    preview, failures = preview_and_failures(result)
    st.success(
        f"完成 done: {result.rows} 行 rows in {result.seconds:.1f} s, "
        f"{result.error_rows} 行失败 with an error; text column {result.column!r}"
        + (f"; 已去掉置信度低于 {result.min_confidence:.2f} 的三元组 triples below confidence "
           f"{result.min_confidence:.2f} dropped" if result.min_confidence > 0 else "")
    )
    st.download_button(
        "下载标注结果 download the labelled CSV", result.csv_bytes, file_name=download_name(uploaded.name),
        mime="text/csv", key="batch_download",
    )
    st.subheader(f"预览 Preview (前 first {len(preview)} 行 rows)")
    st.dataframe(preview, use_container_width=True)
    st.subheader(f"失败的行 Failed rows ({len(failures)})")
    if 0 < len(failures) <= 20:
        st.table(failures)
    elif len(failures):
        st.dataframe(failures, use_container_width=True)  # scrolls instead of drawing every row
    else:
        st.caption("没有失败的行 no row failed")
