"""The labelling tool: its HTTP API (urllib), its command line, and the page in a real headless Chromium."""

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from stages.lib import StageError
from tests.conftest import REPO_ROOT
from tools.label_server import LabelHandler, make_server


def pool_record(i: int) -> dict:
    return {"prompt": [{"role": "system", "content": "Change their mind, politely."},
                       {"role": "user", "content": f"OP: CMV: claim number {i} is true\nHere is why."}],
            "response_1": f"Reply A to claim {i}.", "response_2": f"Reply B to claim {i}.",
            "metadata": {"source": "cmv", "conversation_id": f"t3_{i}", "utterance_id": f"t1_{i}",
                         "prompt_id": f"cmv:t1_{i}", "pool": "human"}}


def label(i: int, preference: str, labeller: str = "tester", **texts) -> dict:
    return {"prompt_id": f"cmv:t1_{i}", "preference": preference,
            "response_1": texts.get("response_1", f"Reply A to claim {i}."),
            "response_2": texts.get("response_2", f"Reply B to claim {i}."), "labeller": labeller}


def write_lines(path: Path, rows) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def read_labels(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def pool(tmp_path) -> Path:
    return write_lines(tmp_path / "pool.jsonl", [pool_record(i) for i in range(5)])


@contextlib.contextmanager
def serving(pool: Path, labels: Path, labeller: str = "tester"):
    threads_before = set(threading.enumerate())
    server = make_server(pool, labels, "127.0.0.1", 0, labeller)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    # Threads of other servers in this process (a Gradio page's idle workers) may end meanwhile: only new ones count.
    assert set(threading.enumerate()) - threads_before == set(), "threads left running after shutdown"


def call(server, path: str, body=None, content_type="application/json", headers=None):
    """(status, JSON payload) of one request."""
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    request = urllib.request.Request(server.url.rstrip("/") + path, data=data, headers=headers or {})
    if data is not None:
        request.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_labels_are_saved_at_once_in_pool_order_and_relabelling_replaces(tmp_path, pool):
    labels = tmp_path / "labels" / "human.jsonl"
    with serving(pool, labels) as server:
        assert call(server, "/api/state")[1] == {"total": 5, "labelled": 0, "next": 0, "labeller": "tester",
                                                 "labels_file": str(labels)}
        assert call(server, "/api/label", {"prompt_id": "cmv:t1_3", "preference": "2"}) == \
            (200, {"total": 5, "labelled": 1, "next": 4})
        assert read_labels(labels) == [label(3, "2")]
        assert call(server, "/api/label", {"prompt_id": "cmv:t1_0", "preference": "tie"})[1]["next"] == 1
        assert read_labels(labels) == [label(0, "tie"), label(3, "2")]
        assert call(server, "/api/label", {"prompt_id": "cmv:t1_3", "preference": "1"})[1]["labelled"] == 2
        assert read_labels(labels) == [label(0, "tie"), label(3, "1")]
        status, pair = call(server, "/api/pair?index=3")
        assert status == 200 and pair == {"index": 3, "prompt_id": "cmv:t1_3", "prompt": pool_record(3)["prompt"],
                                          "response_1": "Reply A to claim 3.", "response_2": "Reply B to claim 3.",
                                          "label": "1", "labelled_on_earlier_samples": False}
        assert call(server, "/api/pair?index=2")[1]["label"] is None
    assert not list(labels.parent.glob(".*.tmp"))


@pytest.mark.parametrize("labelled, start", [
    ([], 0), ([0, 1, 3], 4), ([0, 1, 4], 2), ([4], 0), ([0, 2], 3), ([0, 1, 2, 3, 4], None)])
def test_a_restart_resumes_after_the_last_labelled_pair_wrapping_to_skipped_ones(tmp_path, pool, labelled, start):
    labels = write_lines(tmp_path / "labels.jsonl", [label(i, "1") for i in labelled])
    with serving(pool, labels) as server:
        assert call(server, "/api/state")[1]["next"] == start
        assert call(server, "/api/state")[1]["labelled"] == len(labelled)


def test_skipping_asks_for_the_next_unlabelled_pair_and_writes_nothing(tmp_path, pool):
    labels = write_lines(tmp_path / "labels.jsonl", [label(0, "1"), label(2, "2")])
    before = labels.read_bytes()
    with serving(pool, labels) as server:
        assert [call(server, f"/api/state?after={i}")[1]["next"] for i in range(5)] == [1, 3, 3, 4, 1]
    assert labels.read_bytes() == before


def test_labels_of_prompts_outside_the_pool_are_kept_as_they_are(tmp_path, pool):
    foreign = label(77, "2", labeller="someone else")
    labels = write_lines(tmp_path / "labels.jsonl", [foreign, label(1, "tie")])
    with serving(pool, labels) as server:
        state = call(server, "/api/state")[1]
        assert (state["total"], state["labelled"], state["next"]) == (5, 1, 2)
        call(server, "/api/label", {"prompt_id": "cmv:t1_0", "preference": "2"})
    assert read_labels(labels) == [label(0, "2"), label(1, "tie"), foreign]


def test_a_label_on_earlier_samples_counts_and_a_new_label_replaces_its_texts(tmp_path, pool):
    labels = write_lines(tmp_path / "labels.jsonl", [label(0, "2", labeller="ana", response_1="old A", response_2="old B")])
    with serving(pool, labels, labeller="bo") as server:
        pair = call(server, "/api/pair?index=0")[1]
        assert pair["label"] == "2" and pair["labelled_on_earlier_samples"] is True
        assert pair["response_1"] == "Reply A to claim 0."
        assert call(server, "/api/state")[1]["labelled"] == 1
        call(server, "/api/label", {"prompt_id": "cmv:t1_0", "preference": "1"})
    assert read_labels(labels) == [label(0, "1", labeller="bo")]


@pytest.mark.parametrize("path, body, content_type, status, message", [
    ("/api/label", {"prompt_id": "cmv:t1_9", "preference": "1"}, "application/json", 400,
     "prompt_id 'cmv:t1_9' is not in the pool"),
    ("/api/label", {"prompt_id": "cmv:t1_0", "preference": "left"}, "application/json", 400,
     "preference must be \"1\", \"2\" or \"tie\", got 'left'"),
    ("/api/label", {"prompt_id": "cmv:t1_0", "preference": 1}, "application/json", 400,
     "preference must be \"1\", \"2\" or \"tie\", got 1"),
    ("/api/label", b"{not json", "application/json", 400, "body is not valid JSON"),
    ("/api/label", ["cmv:t1_0", "1"], "application/json", 400, "body must be a JSON object"),
    ("/api/label", {"prompt_id": "cmv:t1_0", "preference": "1"}, "text/plain", 415,
     "send the label as application/json"),
    ("/api/labels", {"prompt_id": "cmv:t1_0", "preference": "1"}, "application/json", 404,
     "no such endpoint: /api/labels"),
    ("/api/pair?index=5", None, None, 400, "index must be an integer from 0 to 4, got '5'"),
    ("/api/pair?index=-1", None, None, 400, "index must be an integer from 0 to 4, got '-1'"),
    ("/api/pair", None, None, 400, "index must be an integer from 0 to 4, got ''"),
    ("/api/state?after=x", None, None, 400, "after must be an integer from 0 to 4, got 'x'"),
    ("/favicon.ico", None, None, 404, "no such page: /favicon.ico"),
])
def test_bad_requests_get_a_reason_and_change_nothing(tmp_path, pool, path, body, content_type, status, message):
    labels = tmp_path / "labels.jsonl"
    with serving(pool, labels) as server:
        assert call(server, path, body, content_type) == (status, {"error": message})
    assert not labels.exists()


def test_a_label_that_cannot_be_written_is_reported_and_not_counted(tmp_path, pool):
    (tmp_path / "not-a-dir").write_text("")
    with serving(pool, tmp_path / "not-a-dir" / "labels.jsonl") as server:
        status, payload = call(server, "/api/label", {"prompt_id": "cmv:t1_0", "preference": "1"})
        assert status == 500 and payload["error"].startswith("could not write the labels file: ")
        assert call(server, "/api/state")[1]["labelled"] == 0
        assert call(server, "/api/pair?index=0")[1]["label"] is None


def test_requests_for_another_host_name_are_refused(tmp_path, pool):
    with serving(pool, tmp_path / "labels.jsonl") as server:
        assert call(server, "/api/state", headers={"Host": "evil.example:80"}) == \
            (403, {"error": "unexpected Host header 'evil.example:80'"})
        assert call(server, "/api/state", headers={"Host": f"localhost:{server.server_address[1]}"})[0] == 200


def test_an_idle_browser_connection_does_not_hold_up_shutdown(tmp_path, pool, monkeypatch):
    monkeypatch.setattr(LabelHandler, "timeout", 600)
    threads_before = set(threading.enumerate())
    server = make_server(pool, tmp_path / "labels.jsonl", "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    with socket.create_connection(server.server_address[:2], timeout=5) as idle:
        assert call(server, "/api/state")[0] == 200  # the idle socket has been accepted by now
        stopping = threading.Thread(target=lambda: (server.shutdown(), server.server_close()))
        stopping.start()
        stopping.join(timeout=5)
        assert not stopping.is_alive(), "server_close waits for an idle connection"
        assert idle.recv(1) == b""
    thread.join(timeout=5)
    assert set(threading.enumerate()) == threads_before


def test_the_page_is_one_self_contained_file(tmp_path, pool):
    with serving(pool, tmp_path / "labels.jsonl") as server:
        with urllib.request.urlopen(server.url, timeout=5) as response:
            assert response.headers["Content-Type"] == "text/html; charset=utf-8"
            page = response.read().decode()
    assert "<script>" in page and "<style>" in page
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page) and "@import" not in page


@pytest.mark.parametrize("pool_rows, label_rows, kwargs, message", [
    (None, [], {}, r"pool\.jsonl: input not found$"),
    ([pool_record(0), "{oops"], [], {}, r"pool\.jsonl:2: malformed JSON: "),
    ([], [], {}, r"pool\.jsonl: the pool is empty; nothing to label$"),
    ([pool_record(0)], [label(0, "1"), label(1, "both")], {},
     r"labels\.jsonl:2: preference must be \"1\", \"2\" or \"tie\", got 'both'$"),
    ([pool_record(0)], [label(0, "1"), label(0, "2")], {},
     r"labels\.jsonl:2: duplicate label for prompt_id 'cmv:t1_0' \(first at line 1\)$"),
    ([pool_record(0)], [], {"host": "0.0.0.0"}, r"^--host 0\.0\.0\.0: the labelling server has no authentication "
                                                r"and only listens on localhost"),
])
def test_bad_input_at_startup_is_one_line(tmp_path, pool_rows, label_rows, kwargs, message):
    pool = tmp_path / "pool.jsonl"
    if pool_rows is not None:
        write_lines(pool, pool_rows)
    labels = write_lines(tmp_path / "labels.jsonl", label_rows)
    with pytest.raises(StageError, match=message):
        make_server(pool, labels, **{"host": "127.0.0.1", "port": 0, **kwargs})


def test_command_line_serves_until_interrupted_and_reports_errors_in_one_line(tmp_path, pool):
    labels = tmp_path / "labels.jsonl"
    command = [sys.executable, "-m", "tools.label_server", "--pool", str(pool), "--labels", str(labels)]
    failed = subprocess.run([*command[:4], str(tmp_path / "missing.jsonl"), *command[5:]], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=30)
    assert failed.returncode == 1 and failed.stderr == f"error: {tmp_path / 'missing.jsonl'}: input not found\n"

    # Started as from a shell or tool that ignores SIGINT (children inherit that): Ctrl-C must still stop it.
    process = subprocess.Popen([*command, "--port", "0", "--labeller", "cli"], cwd=REPO_ROOT, text=True,
                               stderr=subprocess.PIPE, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        started = process.stderr.readline()
        url = re.search(r"open (http://127\.0\.0\.1:\d+/)", started).group(1)
        assert "0 / 5 pairs labelled (labeller cli)" in started
        request = urllib.request.Request(url + "api/label", json.dumps({"prompt_id": "cmv:t1_2", "preference": "2"}).encode(),
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=5) as response:
            assert json.loads(response.read()) == {"total": 5, "labelled": 1, "next": 3}
        process.send_signal(signal.SIGINT)
        _, rest = process.communicate(timeout=30)  # drains stderr while it shuts down
        assert process.returncode == 0 and "stopped; labels are in" in rest
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert read_labels(labels) == [label(2, "2", labeller="cli")]


# The page in a real browser (the `browser` fixture: tests/conftest.py).

class Page:
    """The labelling page as a person sees it: keys in, what is on screen out."""

    def __init__(self, driver, url: str):
        from selenium.webdriver.common.by import By
        from selenium.webdriver.common.keys import Keys
        from selenium.webdriver.support.ui import WebDriverWait

        self.driver, self.by, self.keys = driver, By, Keys
        self.wait = WebDriverWait(driver, 5, poll_frequency=0.02)
        driver.get(url)

    def text(self, element_id: str) -> str:
        return self.driver.find_element(self.by.ID, element_id).text

    def view(self) -> tuple[str, str | None]:
        body = self.driver.find_element(self.by.TAG_NAME, "body")
        return body.get_attribute("data-view"), body.get_attribute("data-index")

    def wait_for(self, view: str, index: int | None = None, progress: str | None = None) -> None:
        expected = (view, None if index is None else str(index))
        self.wait.until(lambda _: self.view() == expected and (progress is None or self.text("progress") == progress),
                        message=f"expected {expected} {progress!r}, page shows {self.view()} {self.text('progress')!r}")

    def press(self, key: str) -> None:
        from selenium.webdriver.common.action_chains import ActionChains

        ActionChains(self.driver).send_keys(getattr(self.keys, key, key)).perform()

    def classes(self, element_id: str) -> set[str]:
        return set((self.driver.find_element(self.by.ID, element_id).get_attribute("class") or "").split())


def test_labelling_by_keyboard_saves_each_label_and_a_reload_resumes(tmp_path, pool, browser):
    labels = tmp_path / "labels.jsonl"
    with serving(pool, labels) as server:
        page = Page(browser, server.url)
        page.wait_for("pair", 0, "0 / 5 labelled")
        assert page.text("position") == "Pair 1 of 5" and page.text("prompt-id") == "cmv:t1_0"
        assert page.text("response-1").endswith("Reply A to claim 0.")
        assert page.text("response-2").endswith("Reply B to claim 0.")
        assert "OP: CMV: claim number 0 is true\nHere is why." in page.text("conversation")
        system = browser.find_element(page.by.CSS_SELECTOR, "#conversation details.system")
        assert system.get_attribute("open") is None and "Change their mind" not in page.text("conversation")
        left, right = (browser.find_element(page.by.ID, f"response-{n}").rect for n in (1, 2))
        assert left["y"] == right["y"] and left["x"] + left["width"] <= right["x"], "responses are not side by side"

        expected = []
        for key, preference, index in [("1", "1", 0), ("2", "2", 1), ("t", "tie", 2)]:
            page.press(key)
            expected.append(label(index, preference))
            page.wait_for("pair", index + 1, f"{index + 1} / 5 labelled")
            assert read_labels(labels) == expected

        browser.refresh()
        page.wait_for("pair", 3, "3 / 5 labelled")
        assert page.text("prompt-id") == "cmv:t1_3"
    assert read_labels(labels) == expected


def test_skip_back_relabel_and_the_end_of_the_pool(tmp_path, pool, browser):
    labels = tmp_path / "labels.jsonl"
    with serving(pool, labels) as server:
        page = Page(browser, server.url)
        page.wait_for("pair", 0, "0 / 5 labelled")
        page.press("ARROW_LEFT")
        page.wait_for("pair", 1, "1 / 5 labelled")
        page.press("s")
        page.wait_for("pair", 2, "1 / 5 labelled")
        assert read_labels(labels) == [label(0, "1")]
        page.press("u")
        page.wait_for("pair", 1)
        page.press("BACKSPACE")
        page.wait_for("pair", 0)
        assert "chosen" in page.classes("response-1") and "chosen" not in page.classes("response-2")
        assert "current" in page.classes("choose-1")

        page.press("ARROW_RIGHT")
        page.wait_for("pair", 1, "1 / 5 labelled")
        assert read_labels(labels) == [label(0, "2")]

        page.press("s")
        page.wait_for("pair", 2)
        for index in (2, 3, 4):
            page.press("t")
            page.wait_for("pair", 1 if index == 4 else index + 1, f"{index} / 5 labelled")
        page.press("2")
        page.wait_for("done", None, "5 / 5 labelled")
        assert "All pairs are labelled" in page.text("done") and str(labels) in page.text("done")
        assert [row["preference"] for row in read_labels(labels)] == ["2", "2", "tie", "tie", "tie"]

        page.press("u")
        page.wait_for("pair", 1)
        assert "chosen" in page.classes("response-2")
        browser.refresh()
        page.wait_for("done", None, "5 / 5 labelled")
