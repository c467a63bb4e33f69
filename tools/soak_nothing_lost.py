"""Soak for issue #11: concurrent model.label runs plus browser sessions labelling, for a few minutes.

    python -m tools.soak_nothing_lost --model runs/demo/merged [--minutes 4] [--rows 40]

Three `python -m model.label` processes label the same CSV into three different outputs, over and
over; two browser sessions (Debian chromium, as in the browser tests) upload it on the batch page and
download the result, over and over. Every CLI output must equal a single reference run's bytes and
every download the first download's bytes; any error or difference is printed and the exit code is 1.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UPLOAD = '[data-testid="stFileUploader"] input[type="file"]'


def write_input(path: Path, rows: int) -> None:
    from core.dataset import read_jsonl

    texts = [e.text for e in read_jsonl(ROOT / "data" / "mixed_dev_dataset.jsonl") if e.task == "classification"]
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "comment"])
        for i in range(rows):
            writer.writerow([i, texts[i % len(texts)]])


def label_cmd(model: str, src: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "model.label", "--model", model, "--input", str(src), "--output", str(out)]


def cli_worker(n: int, model: str, src: Path, folder: Path, reference: bytes, until: float, report: dict) -> None:
    out = folder / f"cli_{n}.csv"
    while time.time() < until:
        out.unlink(missing_ok=True)
        done = subprocess.run(label_cmd(model, src, out), cwd=ROOT, capture_output=True, text=True)
        if done.returncode != 0:
            report["errors"].append(f"cli {n}: exit {done.returncode}: {done.stderr[-500:]}")
        elif out.read_bytes() != reference:
            report["errors"].append(f"cli {n}: output differs from the reference run")
        else:
            report["cli_runs"] += 1


def browser_worker(n: int, url: str, data: bytes, folder: Path, until: float, report: dict) -> None:
    """One browser session; Playwright's sync API is per thread, so each session has its own."""
    from playwright.sync_api import sync_playwright

    from tests.e2e.streamlit_server import CHROMIUM, CHROMIUM_ARGS

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            _browse(n, browser, url, data, folder, until, report)
        finally:
            browser.close()


def _browse(n, browser, url, data, folder, until, report) -> None:
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    page = context.new_page()
    try:
        while time.time() < until:
            page.goto(f"{url}/批量标注_Batch")
            # Generous: on 2 cores shared with three labelling processes a page can take a while to draw.
            page.wait_for_selector(UPLOAD, state="attached", timeout=180_000)
            page.set_input_files(UPLOAD, files=[{"name": "soak.csv", "mimeType": "text/csv", "buffer": data}])
            page.get_by_role("button", name="开始标注 Label the file").click(timeout=60_000)
            with page.expect_download(timeout=300_000) as info:
                page.locator(".stDownloadButton button", has_text="download the labelled CSV").click(timeout=300_000)
            path = folder / f"browser_{n}.csv"
            info.value.save_as(path)
            got = path.read_bytes()
            with report["lock"]:
                first = report.setdefault("browser_reference", got)
            if "Traceback" in page.inner_text("section.main"):
                report["errors"].append(f"browser {n}: a traceback on the page")
            elif got != first:
                report["errors"].append(f"browser {n}: download differs from the first download")
            else:
                report["browser_runs"] += 1
    except Exception as err:  # noqa: BLE001 - the soak reports every failure
        report["errors"].append(f"browser {n} at {time.strftime('%H:%M:%S')}: {type(err).__name__}: {err}")
    finally:
        context.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--minutes", type=float, default=4.0)
    parser.add_argument("--rows", type=int, default=40)
    parser.add_argument("--work", default="runs/soak")
    args = parser.parse_args()
    folder = Path(args.work)
    folder.mkdir(parents=True, exist_ok=True)
    src = folder / "input.csv"
    write_input(src, args.rows)
    ref = folder / "reference.csv"
    ref.unlink(missing_ok=True)
    subprocess.run(label_cmd(args.model, src, ref), cwd=ROOT, check=True, capture_output=True)
    reference = ref.read_bytes()

    from tests.e2e.streamlit_server import start_server, stop_server

    report = {"errors": [], "cli_runs": 0, "browser_runs": 0, "lock": threading.Lock()}
    server = start_server(args.model, folder)
    started = time.time()
    until = started + 60 * args.minutes
    try:
        data = src.read_bytes()
        threads = [threading.Thread(target=cli_worker, args=(n, args.model, src, folder, reference, until, report))
                   for n in range(3)]
        threads += [threading.Thread(target=browser_worker, args=(n, server.url, data, folder, until, report))
                    for n in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        stop_server(server)
    minutes = (time.time() - started) / 60
    print(f"soak: {minutes:.1f} min, {report['cli_runs']} CLI runs and {report['browser_runs']} browser runs "
          f"identical to their reference, {len(report['errors'])} errors")
    for error in report["errors"]:
        print("  -", error)
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
