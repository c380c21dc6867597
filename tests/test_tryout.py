"""The try-out page: model discovery, lazy loading of at most two models, streamed replies, votes, and the page
itself in headless Chromium."""

import json
import logging
import shutil
import socket
import time
from pathlib import Path

import pytest

from stages.lib import StageError
from stages.lib.votes import read_votes
from tests.tiny import save_tiny_model
from tools import tryout

log = logging.getLogger("test_tryout")


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    """A models/ directory as the pipeline leaves it: two chat models, a reward model, a broken directory and
    a training scratch directory."""
    root = tmp_path_factory.mktemp("tryout") / "models"
    save_tiny_model(root / "base")
    shutil.copytree(root / "base", root / "sft" / "persona")
    shutil.copytree(root / "base", root / "reward" / "style")
    shutil.copytree(root / "base", root / "sft" / "agent.work" / "checkpoint-2")
    (root / "dpo" / "broken").mkdir(parents=True)
    (root / "dpo" / "broken" / "config.json").write_text("{not json")
    return root


def test_every_chat_model_is_offered_and_reward_models_and_scratch_are_not(models_dir):
    assert list(tryout.find_models(models_dir)) == ["base", "dpo/broken", "sft/persona"]
    assert tryout.find_models(models_dir / "missing") == {}


def test_at_most_two_models_are_held_and_a_broken_one_is_a_line(models_dir, monkeypatch):
    models = tryout.Models(tryout.find_models(models_dir))
    loads = []
    real = tryout.Models._load
    monkeypatch.setattr(tryout.Models, "_load", lambda self, path: loads.append(path.name) or real(self, path))
    models.get("base")
    models.get("sft/persona")
    models.get("base")  # held: no second load
    assert list(models.loaded) == ["sft/persona", "base"] and loads == ["base", "persona"]
    with pytest.raises(StageError) as err:
        models.get("dpo/broken")
    assert str(err.value).startswith(f"dpo/broken: cannot load {models_dir / 'dpo' / 'broken'}")
    assert "\n" not in str(err.value)
    assert list(models.loaded) == ["base"]  # the least recently used went to make room; the others stay usable
    models.get("sft/persona")
    assert list(models.loaded) == ["base", "sft/persona"] and loads == ["base", "persona", "broken", "persona"]
    with pytest.raises(StageError, match=r"^nope: no such model \(known: base, dpo/broken, sft/persona\)$"):
        models.get("nope")


def test_replies_stream_and_a_seed_repeats_a_sampled_reply(models_dir):
    models = tryout.Models(tryout.find_models(models_dir))
    settings = tryout.Settings(system="Be brief.", temperature=1.0, top_p=0.9, seed=3, max_new_tokens=12)
    messages = tryout.conversation(settings, [{"role": "user", "content": "hello there"}])
    assert messages[0] == {"role": "system", "content": "Be brief."}
    steps = list(tryout.stream_reply(models, "base", messages, settings, interval=0))
    assert len(steps) > 2 and all(later.startswith(earlier) for earlier, later in zip(steps, steps[1:]))
    again = list(tryout.stream_reply(models, "base", messages, settings))
    assert again[-1] == steps[-1] and steps[-1].strip()


def test_the_page_refuses_to_listen_beyond_loopback(models_dir, tmp_path):
    with pytest.raises(StageError, match=r"^--host 0\.0\.0\.0: the try-out page has no authentication"):
        tryout.launch(models_dir, tmp_path / "votes.jsonl", host="0.0.0.0")
    with pytest.raises(StageError, match=r"^--models .*: no model directories found"):
        tryout.launch(tmp_path / "none", tmp_path / "votes.jsonl")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def page(models_dir, tmp_path):
    votes = tmp_path / "labels" / "tryout.jsonl"
    started = time.perf_counter()
    app, models, url = tryout.launch(models_dir, votes, port=free_port(), labeller="tester")
    log.info("page up in %.1f s", time.perf_counter() - started)
    yield url, votes, models
    app.close()


class TryoutPage:
    """The try-out page as a person uses it: clicks and keys in, what is on screen out."""

    def __init__(self, driver, url: str):
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        self.driver, self.by = driver, By
        self.wait = WebDriverWait(driver, 60, poll_frequency=0.1)
        driver.get(url)
        self.wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#compare-send"))

    def css(self, selector: str):
        return self.driver.find_element(self.by.CSS_SELECTOR, selector)

    def pick(self, radio: str, name: str) -> None:
        labels = self.driver.find_elements(self.by.CSS_SELECTOR, f"#{radio} label")
        next(label for label in labels if label.text.strip() == name).click()

    def reply(self, side: str) -> str:
        return self.css(f"#reply-{side} textarea").get_attribute("value")

    def status(self) -> str:
        return self.css("#compare-status").text

    def send(self, message: str) -> None:
        box = self.css("#compare-message textarea")
        box.clear()
        box.send_keys(message)
        self.css("#compare-send").click()

    def votable(self) -> bool:
        return self.css("#vote-left").is_enabled()


def test_compare_two_models_vote_and_find_the_vote_in_the_labels_file(browser, page, tmp_path):
    url, votes, models = page
    started = time.perf_counter()
    ui = TryoutPage(browser, url)
    ui.pick("model-a", "base")
    ui.pick("model-b", "dpo/broken")
    ui.send("Should cities ban cars from their centres?")
    ui.wait.until(lambda _: "⚠" in ui.status())
    assert "dpo/broken: cannot load" in ui.status() and not ui.votable()  # its error, on one line

    ui.pick("model-b", "sft/persona")
    clicked = time.perf_counter()
    ui.send("Should cities ban cars from their centres?")
    ui.wait.until(lambda _: ui.status().startswith("Both replies"))
    log.info("click to both replies: %.2f s", time.perf_counter() - clicked)
    left, right = ui.reply("left"), ui.reply("right")
    assert left.strip() and right.strip()
    assert "base" not in ui.status() and "sft/persona" not in ui.status()  # names hidden until the vote
    assert ui.votable()

    ui.css("#vote-left").click()
    ui.wait.until(lambda _: "Left:" in ui.status())
    [vote] = read_votes(votes)
    assert f"Left: {vote['models'][0]} · Right: {vote['models'][1]}" in ui.status()
    assert sorted(vote["models"]) == ["base", "sft/persona"]
    assert (vote["preference"], vote["labeller"]) == ("1", "tester")
    assert (vote["response_1"], vote["response_2"]) == (left, right)
    assert vote["prompt"] == [{"role": "user", "content": "Should cities ban cars from their centres?"}]
    assert vote["settings"]["max_new_tokens"] == 256 and vote["settings"]["seed"] == 0
    assert not ui.votable()  # one vote a comparison

    browser.find_element(ui.by.XPATH, "//button[@role='tab' and contains(., 'Leaderboard')]").click()
    ui.wait.until(lambda _: "1 vote in" in ui.css("#leaderboard-note").text)
    table = ui.css("#leaderboard").text
    assert vote["models"][0] in table and vote["models"][1] in table
    assert models.loads <= 3 and len(models.loaded) <= 2
    log.info("browser test: %.1f s from opening the page", time.perf_counter() - started)


def test_the_chat_tab_streams_a_reply_in_the_conversation(browser, page):
    url, _, _ = page
    ui = TryoutPage(browser, url)
    browser.find_element(ui.by.XPATH, "//button[@role='tab' and contains(., 'Chat')]").click()
    box = ui.css("#chat-message textarea")
    box.send_keys("hello, who are you?")
    ui.css("#chat-send").click()
    ui.wait.until(lambda _: len(browser.find_elements(ui.by.CSS_SELECTOR, "#chat-history .message")) >= 2)
    texts = [m.text for m in browser.find_elements(ui.by.CSS_SELECTOR, "#chat-history .message")]
    assert "hello, who are you?" in texts[0]


def test_votes_file_errors_name_the_line(models_dir, tmp_path):
    votes = tmp_path / "votes.jsonl"
    good = {"prompt_id": "tryout-1", "preference": "1", "response_1": "a", "response_2": "b", "labeller": "x",
            "prompt": [{"role": "user", "content": "hi"}], "models": ["base", "rl"], "settings": {}}
    votes.write_text(json.dumps(good) + "\n" + json.dumps({**good, "prompt_id": "tryout-2",
                                                            "models": ["base", "base"]}) + "\n")
    with pytest.raises(StageError, match=r"votes\.jsonl:2: both replies come from base; a vote compares two models$"):
        tryout.launch(models_dir, votes)
