"""单条标注: type a comment, get its category and its relation triples.

    streamlit run app.py -- --model runs/demo/merged

Other pages live in pages/ (batch CSV, training curves, evaluation). All of them share one model
per server process (app_support.ui) and stay thin: the work is in model/ and app_support/.
"""

import pandas as pd
import streamlit as st

from app_support.examples import EXAMPLES
from app_support.highlight import highlight_html, legend_html
from app_support.settings import user_message
from app_support.ui import confidence_slider, page_setup, require_model
from model.label import kept_triples

model_dir = page_setup("单条标注 Label a comment")
lm = require_model(model_dir)

st.title("单条标注 Label a comment")
st.caption("输入一条中文评论或句子：模型给出类别，并抽取 (主体, 关系, 客体) 三元组。")


def _fill(text: str) -> None:
    # Runs before the rerun draws the text area, so setting its key's state fills the box.
    st.session_state["comment"] = text
    st.session_state.pop("result", None)


st.markdown("**示例 Examples** (点击填入 click to fill in)")
columns = st.columns(len(EXAMPLES))
for column, (name, text) in zip(columns, EXAMPLES, strict=True):
    column.button(name, key=f"example-{name}", help=text, on_click=_fill, args=(text,))

text = st.text_area("评论 Comment", key="comment", height=120, placeholder="例如：这次买的橙子很新鲜，还会回购")
# Applied to the answer already shown as well: moving it reruns the page, not the model.
min_confidence = confidence_slider("comment_min_confidence")
if st.button("标注 Label", type="primary"):
    from model.predict import predict

    try:
        with st.spinner("标注中 labelling..."):
            prediction = predict(lm, [text])[0]
    except Exception as err:  # noqa: BLE001 - a message on the page, not a traceback
        st.error(f"预测失败 prediction failed: {user_message(err)}")
        st.stop()
    # Kept in the session so the result survives reruns caused by other widgets.
    st.session_state["result"] = prediction

prediction = st.session_state.get("result")
if prediction is not None:
    if prediction.error:
        st.warning(f"无法标注 cannot label: {prediction.error}")
    else:
        triples = kept_triples(prediction.triples, min_confidence)
        hidden = len(prediction.triples) - len(triples)
        left, right = st.columns([1, 3])
        left.metric("类别 Category", prediction.category or "(none)")
        if prediction.category_confidence is not None:
            left.caption(f"置信度 confidence: {prediction.category_confidence:.3f}")
        left.caption(f"用时 time taken: {prediction.seconds:.2f} s")
        with right:
            st.markdown("**三元组 Triples**")
            if triples:
                table = pd.DataFrame([t.to_output() for t in triples], index=range(1, len(triples) + 1))
                shown = [c for c in ("subject", "predicate", "object", "confidence", "subject_type", "object_type")
                         if c in table.columns]
                st.table(table[shown].style.format({"confidence": "{:.3f}"}) if "confidence" in shown
                         else table[shown])
            else:
                st.info("没有抽取到三元组 no triples found")
            if hidden:
                st.caption(f"{hidden} 个三元组低于置信度 {min_confidence:.2f}，已隐藏 "
                           f"{hidden} triple(s) below confidence {min_confidence:.2f} hidden")
        st.markdown("**原文标注 Spans in the text**  " + legend_html(), unsafe_allow_html=True)
        st.markdown(
            '<div class="highlighted" style="line-height:1.9;padding:0.6em 0.8em;border:1px solid #ddd;'
            f'border-radius:6px;margin-bottom:1em">{highlight_html(prediction.text, triples)}</div>',
            unsafe_allow_html=True,
        )
        if prediction.warnings:
            with st.expander(f"解析提示 parse warnings ({len(prediction.warnings)})"):
                for warning in prediction.warnings:
                    st.write("- " + warning)
        with st.expander("模型原始输出 raw answers"):
            st.json(prediction.raw)
