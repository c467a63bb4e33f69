"""The Streamlit app in a real browser (playwright + Debian chromium) against the tiny merged model.

One server for the whole module (tests/e2e/conftest.py); the last test checks it loaded the model
exactly once. Screenshots of every page go to tests/e2e/screenshots/ (gitignored).
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest

from tests.e2e.streamlit_server import VIEWPORT, screenshot, start_server, stop_server

pytestmark = pytest.mark.e2e

UPLOAD = '[data-testid="stFileUploader"] input[type="file"]'
ERRORS = ".stException"
LABEL_BUTTON = "标注 Label"
# Page URLs: Streamlit names pages by their file names (pages/1_批量标注_Batch.py), bilingual like the titles.
BATCH, EVALUATION = "批量标注_Batch", "评估_Evaluation"
NAV = '[data-testid="stSidebarNav"] a'
COMMENTS = ["橙子很新鲜，汁水多", "房间干净，服务热情", "屏幕清晰，开机很快", "面料舒服，尺码合适", "牛奶很好喝"]


def no_exception(page) -> None:
    assert page.locator(ERRORS).count() == 0, page.locator(ERRORS).first.inner_text()


def open_page(page, server, path: str = "") -> None:
    page.goto(f"{server.url}/{path}")
    page.wait_for_selector('[data-testid="stSidebar"]')


def label_comment(page, text: str) -> None:
    page.fill(".stTextArea textarea", text)
    page.get_by_role("button", name=LABEL_BUTTON).click()


def shown_result(page) -> tuple[str, set[tuple[str, str, str]]]:
    """(category, {(subject, predicate, object)}) as the home page shows them, once it shows them."""
    page.wait_for_selector('[data-testid="metric-container"]')
    page.wait_for_selector('[data-testid="stTable"], .stAlert')
    category = page.locator('[data-testid="stMetricValue"]').first.inner_text().strip()
    triples = set()
    for row in page.locator('[data-testid="stTable"] tbody tr').all():
        cells = [cell.inner_text().strip() for cell in row.locator("td").all()]
        triples.add((cells[0], cells[1], cells[2]))  # subject, predicate, object
    return category, triples


def direct(lm, text: str) -> tuple[str, set[tuple[str, str, str]]]:
    """predict() called in this process, one torch thread like the server, so floats match exactly."""
    import torch

    from model.predict import predict

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        prediction = predict(lm, [text])[0]
    finally:
        torch.set_num_threads(threads)
    return prediction.category, {t.key() for t in prediction.triples}


# --------------------------------------------------------------------------- home page


def assert_home_answers_like_predict(page, merged: Path, tmp_path: Path, comment: str = COMMENTS[1]) -> None:
    """A fresh server on `merged`: its home page shows, for one comment, what model.predict gives directly."""
    from model.load import load_merged

    server = start_server(merged, tmp_path)
    try:
        open_page(page, server)
        label_comment(page, comment)
        category, triples = shown_result(page)
        lm = load_merged(merged, device="cpu")
        assert category in lm.schema["labels"]
        assert (category, triples) == direct(lm, comment)
        no_exception(page)
    finally:
        stop_server(server)


def test_home_labels_a_comment(page, server, direct_model):
    open_page(page, server)
    page.get_by_role("button", name="酒店").click()  # an example button fills the box
    page.wait_for_function("document.querySelector('.stTextArea textarea').value.includes('前台')")
    label_comment(page, COMMENTS[0])
    category, triples = shown_result(page)
    assert category in direct_model.schema["labels"]
    assert (category, triples) == direct(direct_model, COMMENTS[0])
    page.wait_for_selector(".highlighted")
    assert COMMENTS[0][:4] in page.locator(".highlighted").inner_text()
    assert "time taken" in page.inner_text("section.main")
    no_exception(page)
    screenshot(page, "1_home")


def test_confidence_is_shown_and_the_slider_hides_triples_below_it(page, server, direct_model):
    text = "《平凡的世界》是作家路遥创作的长篇小说"
    open_page(page, server)
    # The sidebar names every page in both languages.
    assert [page.locator(NAV).nth(i).inner_text().strip() for i in (1, 2, 3)] == [
        "批量标注 Batch", "训练曲线 Training", "评估 Evaluation"]
    label_comment(page, text)
    category, triples = shown_result(page)
    assert triples, "the tiny model gives this sentence a triple, so the slider has something to hide"
    main = page.inner_text("section.main")
    assert re.search(r"置信度 confidence: (0\.\d{3}|1\.000)", main)
    header = [cell.inner_text().strip() for cell in page.locator('[data-testid="stTable"] thead th').all()]
    assert "confidence" in header
    page.locator('[role="slider"]').click()
    for _ in range(20):  # 20 steps of 0.05: 1.0, above every triple's confidence
        page.keyboard.press("ArrowRight")
    page.wait_for_selector("text=no triples found")
    assert re.search(r"\d+ triple\(s\) below confidence 1\.00 hidden", page.inner_text("section.main"))
    assert page.locator('[data-testid="metric-container"]').first.inner_text().find(category) >= 0
    no_exception(page)
    screenshot(page, "1_home_min_confidence")


def test_two_sessions_label_at_the_same_time(browser, server, direct_model):
    """Two browser contexts (two sessions, one shared model and lock) click at once; both answers are right."""
    texts = [COMMENTS[1], "《平凡的世界》是作家路遥创作的长篇小说"]
    contexts = [browser.new_context(viewport=VIEWPORT) for _ in texts]
    try:
        pages = [context.new_page() for context in contexts]
        for page in pages:
            page.set_default_timeout(90_000)
            open_page(page, server)
            page.fill(".stTextArea textarea", "")
        for page, text in zip(pages, texts, strict=True):
            page.fill(".stTextArea textarea", text)
        for page in pages:  # both runs start before either can finish
            page.get_by_role("button", name=LABEL_BUTTON).click()
        shown = [shown_result(page) for page in pages]
        for page in pages:
            no_exception(page)
    finally:
        for context in contexts:
            context.close()
    assert shown == [direct(direct_model, text) for text in texts]


# --------------------------------------------------------------------------- batch page


def comments_csv(encoding: str, rows: int = 50) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["id", "评论", "备注"])
    for i in range(rows):
        # A comma and a quote in some comments: the CSV round trip must keep them in one cell.
        writer.writerow([i, f"{COMMENTS[i % len(COMMENTS)]}，第{i}条" + (', "好"' if i % 7 == 0 else ""), f"n{i}"])
    return buffer.getvalue().encode(encoding)


def upload(page, name: str, data: bytes, mime: str = "text/csv") -> None:
    page.set_input_files(UPLOAD, files=[{"name": name, "mimeType": mime, "buffer": data}])


def preview_headers(page, timeout_s: float = 30) -> list[str]:
    """The preview grid's column headers, read from its accessible table once the grid has filled it in
    (the canvas grid draws, and may redraw, after the page shows the preview's title)."""
    deadline = time.monotonic() + timeout_s
    while True:
        headers = page.locator(".stDataFrame").first.locator('th[role="columnheader"]').all_text_contents()
        if len(headers) > 1 or time.monotonic() > deadline:
            return headers
        page.wait_for_timeout(250)


@pytest.mark.parametrize("encoding", ["utf-8", "gbk"])
def test_batch_labels_a_csv(page, server, direct_model, encoding, tmp_path):
    open_page(page, server, BATCH)
    page.wait_for_selector(UPLOAD, state="attached")
    upload(page, f"comments_{encoding}.csv", comments_csv(encoding))
    page.wait_for_selector("text=评论")  # the preselected text column
    assert page.locator(".stSelectbox").inner_text().strip().endswith("评论")
    page.get_by_role("button", name="开始标注 Label the file").click()
    page.wait_for_selector(".stProgress")
    with page.expect_download(timeout=150_000) as download_info:
        page.locator(".stDownloadButton button", has_text="download the labelled CSV").click(timeout=150_000)
    path = tmp_path / "labelled.csv"
    download_info.value.save_as(path)
    rows = list(csv.reader(path.read_text(encoding="utf-8-sig").splitlines()))
    assert rows[0] == ["id", "评论", "备注", "category", "category_confidence", "triples", "error", "warnings"]
    assert len(rows) == 51
    original = list(csv.reader(comments_csv(encoding).decode(encoding).splitlines()))
    labels = set(direct_model.schema["labels"])
    for got, sent in zip(rows[1:], original[1:], strict=True):
        assert got[:3] == sent
        assert got[3] in labels and 0 < float(got[4]) <= 1 and got[6] == ""
        assert all(0 <= t["confidence"] <= 1 for t in json.loads(got[5]))
    page.wait_for_selector("text=Preview")
    # The preview's first columns are the results (its grid's accessible table; the first header is the index).
    headers = preview_headers(page)
    # The grid draws only the columns in view: the results must be among them, before the input's own.
    assert headers[1:6] == ["category", "category_confidence", "triples", "error", "warnings"], headers
    no_exception(page)
    screenshot(page, f"2_batch_{encoding}")
    if encoding == "utf-8":  # Streamlit scrolls inside its own container: a second shot for the bottom
        page.get_by_text("Failed rows").scroll_into_view_if_needed()
        screenshot(page, "2_batch_bottom")


def test_batch_bad_files_get_a_message_and_the_page_keeps_working(page, server):
    open_page(page, server, BATCH)
    page.wait_for_selector(UPLOAD, state="attached")
    upload(page, "numbers.csv", b"a,b\n1,2\n3,4\n")
    page.wait_for_selector("text=no text column found")
    assert page.get_by_role("button", name="开始标注 Label the file").is_disabled()
    no_exception(page)
    screenshot(page, "2_batch_no_text_column")

    upload(page, "empty.csv", b"")
    page.wait_for_selector(".stAlert >> text=empty.csv is empty")
    no_exception(page)

    png = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01" + bytes(range(256))
    upload(page, "picture.png", png, "image/png")
    page.wait_for_selector(".stAlert >> text=not a text CSV")
    no_exception(page)
    screenshot(page, "2_batch_not_csv")

    upload(page, "ok.csv", "comment\n好吃\n".encode())  # still works after the errors
    page.wait_for_selector("text=约 about 1 行 rows")
    assert page.get_by_role("button", name="开始标注 Label the file").is_enabled()
    no_exception(page)


# --------------------------------------------------------------------------- training and evaluation


def test_training_page_plots_the_loss(page, server):
    open_page(page, server)
    page.locator(NAV, has_text="训练曲线 Training").click()
    image = page.wait_for_selector('[data-testid="stImage"] img')
    page.wait_for_function("img => img.complete && img.naturalWidth > 300", arg=image)
    text = page.inner_text("section.main")
    assert "train_config.json" in text and "摘要 summary" in text  # the runs' summary, sample-decode rates included
    no_exception(page)
    screenshot(page, "3_training")


def dev_sample(data_dir: Path, per_task: int = 3) -> bytes:
    """The first rows of each task from the dev file: a small labelled jsonl to upload."""
    lines = (data_dir / "mixed_dev_dataset.jsonl").read_text(encoding="utf-8").splitlines()
    picked: dict[bool, list[str]] = {True: [], False: []}
    for line in lines:
        extraction = json.loads(line)["target"].startswith("```")
        if len(picked[extraction]) < per_task:
            picked[extraction].append(line)
    return ("\n".join(picked[False] + picked[True]) + "\n").encode("utf-8")


def test_evaluation_page_shows_the_metrics(page, server, data_dir):
    open_page(page, server, EVALUATION)
    page.get_by_text("上传 jsonl upload a jsonl").click()
    page.wait_for_selector(UPLOAD, state="attached")
    upload(page, "sample.jsonl", dev_sample(data_dir), "application/json")
    page.get_by_role("button", name="开始评估 Evaluate").click()
    page.wait_for_selector("text=结果 Results", timeout=120_000)
    page.wait_for_selector(".stDownloadButton")  # the last element: the whole result is drawn
    metrics = page.locator('[data-testid="metric-container"]')
    assert metrics.count() == 7
    text = page.inner_text("section.main")
    labels = ("类别准确率 accuracy", "macro-F1", "三元组 F1", "parse rate", "Per predicate", "Wrong rows",
              "At a minimum confidence")
    for label in labels:
        assert label in text
    assert "6 行 rows: 3 分类 classification, 3 抽取 extraction" in text
    # One row per threshold in the confidence table, 0 (everything kept) first.
    thresholds = page.locator('[data-testid="stTable"]').filter(has_text="cls_coverage")
    assert thresholds.locator("tbody tr").count() == 5
    assert thresholds.locator("tbody tr").first.locator("td").first.inner_text().strip() in ("0", "0.0", "0.0000")
    # Read-only for visitors: no way to replace the served model's metrics.json without --allow-writes.
    assert "保存到模型目录" not in text
    page.wait_for_selector('[data-testid="stImage"] img')  # the confusion matrix
    no_exception(page)
    screenshot(page, "4_evaluation")
    page.get_by_text("下载 metrics.json").scroll_into_view_if_needed()
    screenshot(page, "4_evaluation_bottom")


def readonly_copy(model_dir: Path, folder: Path) -> Path:
    """A copy of the model in a folder nothing can be written to: a tmpfs remounted read-only as root
    (CI), else a folder without write permission."""
    import subprocess

    from tests.conftest import mount_tmpfs

    mounted = mount_tmpfs(folder, "size=64m")
    copy = folder / "merged"
    shutil.copytree(model_dir, copy)
    if mounted:
        subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
    elif os.geteuid() == 0:  # root writes through permission bits: only a read-only mount refuses it
        pytest.skip("a read-only folder for root needs a tmpfs mount, which this machine refused")
    else:
        copy.chmod(0o555)
    return copy


def test_saving_into_a_read_only_model_folder_is_a_message(page, merged_model, data_dir, tmp_path):
    """With --allow-writes the save button appears; a read-only model folder gives one line, no traceback."""
    from tests.conftest import unmount

    model = readonly_copy(merged_model, tmp_path / "ro")
    server = start_server(model, tmp_path, app_args=("--allow-writes",))
    try:
        open_page(page, server, EVALUATION)
        page.get_by_text("上传 jsonl upload a jsonl").click()
        page.wait_for_selector(UPLOAD, state="attached")
        upload(page, "sample.jsonl", dev_sample(data_dir, per_task=1), "application/json")
        page.get_by_role("button", name="开始评估 Evaluate").click()
        page.get_by_role("button", name=re.compile("保存到模型目录")).click(timeout=120_000)
        page.wait_for_selector("text=无法保存 could not save metrics.json", timeout=60_000)
        message = page.locator(".stAlert", has_text="无法保存").inner_text()
        assert "Read-only file system" in message or "Permission denied" in message
        assert str(tmp_path) not in message  # one line, no server path
        no_exception(page)
        assert not (model / "metrics.json").exists()
    finally:
        stop_server(server)
        unmount(tmp_path / "ro")


def test_two_sessions_opening_a_fresh_server_at_once_both_get_the_model(browser, merged_model, tmp_path):
    """The first two visitors of a just-started server: both pages must load the one model (the soak of
    #11 found the second failing with "cannot import name 'PretrainedConfig'" from a concurrent import).
    The model is marked as finetune.demo marks its toy, so both pages must also say it is a demo model."""
    from finetune.demo import mark_demo

    model = tmp_path / "demo" / "merged"
    shutil.copytree(merged_model, model)
    mark_demo(model)
    server = start_server(model, tmp_path)
    contexts = [browser.new_context(viewport=VIEWPORT) for _ in range(2)]
    try:
        pages = [context.new_page() for context in contexts]
        for page in pages:  # both navigations in flight before either script runs far
            page.goto(f"{server.url}/{BATCH}", wait_until="commit")
        for page in pages:
            page.wait_for_selector(UPLOAD, state="attached", timeout=120_000)
            body = page.inner_text("body")
            assert "没有可用的模型" not in body
            assert "演示模型 Demo model" in body and "-parameter toy" in body
            # The favicon is served by this server, not fetched from an emoji CDN (offline servers).
            page.wait_for_function("() => [...document.querySelectorAll('link[rel~=icon]')].some("
                                   "l => l.href.includes('/media/'))", timeout=30_000)
            hrefs = page.eval_on_selector_all("link[rel~=icon]", "links => links.map(l => l.href)")
            assert hrefs and all(href.startswith(server.url) for href in hrefs), hrefs
    finally:
        for context in contexts:
            context.close()
        stop_server(server)


# --------------------------------------------------------------------------- whole-server checks


def test_no_model_page_says_how_to_make_one(browser, tmp_path):
    missing = "runs/e2e_no_such_run/merged"  # relative to the repo root, never created
    other = start_server(missing, tmp_path)
    try:
        context = browser.new_context(viewport=VIEWPORT)
        page = context.new_page()
        page.goto(other.url)
        page.wait_for_selector(".stAlert >> text=No model to serve")
        code = page.locator("code").last.inner_text()
        assert "python -m finetune.train" in code and "python -m finetune.merge --run runs/e2e_no_such_run" in code
        no_exception(page)
        screenshot(page, "0_no_model")
        context.close()
    finally:
        stop_server(other)
    assert "Traceback" not in other.stderr()


def test_model_loaded_once_for_all_sessions(server):
    """Runs last in this module: every page, session and context above shared one load."""
    loads = [line for line in server.stderr().splitlines() if line.startswith("loaded model")]
    assert len(loads) == 1, loads
    assert "Traceback" not in server.stderr()
