"""The playground page at `/` (serve/playground.py) in a real headless Chromium driven by Selenium, against the
session's `python -m serve` process: the page loads and lists the voices, Speak streams PCM and schedules it
through Web Audio (the same bytes as the same request sent with httpx), a bad key shows the server's own message,
and the upload form adds a voice to the picker.

Debian's chromium and chromium-driver (`make system-deps`); Selenium is pointed at /usr/bin/chromedriver and its
Selenium Manager (which downloads drivers) is refused, so nothing here reaches beyond this machine. The test
reads the page's documented state (data-* on #status, the text of #message), not its script's internals."""

from __future__ import annotations

import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
from conftest import SERVE_KEY
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.common.selenium_manager import SeleniumManager
from selenium.webdriver.support.ui import Select, WebDriverWait

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
# Headless and offline: without the background-networking flags Chromium keeps opening connections (updates,
# sync, field trials) that a closed network refuses many at a time. Audio plays without a click.
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--autoplay-policy=no-user-gesture-required",
]  # fmt: skip
SHORT = {"seed": 3, "max_audio_length_ms": 400, "temperature": 0.9}  # 5 frames of 1920 samples
PCM_BYTES_PER_SECOND = 24_000 * 2


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.fail(f"{', '.join(missing)} missing: `make system-deps` installs chromium and chromium-driver (apt)")
    options = Options()
    options.binary_location = str(CHROMIUM)
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"]:
        options.add_argument(flag)

    def no_download(self, args):
        raise AssertionError(f"Selenium Manager called ({args}): it would download a driver")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(SeleniumManager, "binary_paths", no_download)
        driver = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def wait(browser, what: str, condition, timeout: float = 60):
    return WebDriverWait(browser, timeout, poll_frequency=0.1).until(
        lambda d: condition(), message=f"timed out after {timeout:.0f}s waiting for {what}"
    )


def field(browser, element_id: str, value: str, enter: bool = False) -> None:
    element = browser.find_element(By.ID, element_id)
    element.clear()
    element.send_keys(value + (Keys.TAB if enter else ""))  # TAB leaves the field: its change event


def voices(browser) -> dict[str, str]:
    """The picker's options, label → value, read at once (the page rebuilds them on each load of the list)."""
    script = "return [...document.getElementById('voice').options].map((o) => [o.text, o.value])"
    return dict(browser.execute_script(script))


def status(browser) -> dict[str, str]:
    element = browser.find_element(By.ID, "status")
    return {k: element.get_attribute(f"data-{k}") for k in ("state", "bytes", "seconds", "first-audio-ms", "audio")}


def message(browser) -> str:
    return browser.find_element(By.ID, "message").text


def open_page(browser, server, key: str = SERVE_KEY) -> None:
    browser.get(server)
    field(browser, "key", key, enter=True)
    wait(browser, "the voice picker", lambda: "alloy" in voices(browser))


def speak(browser, text: str = "Hello there.", **params) -> dict[str, str]:
    """Speak from the page; its status once the stream has ended."""
    field(browser, "text", text)
    for element_id, name in (("seed", "seed"), ("max-ms", "max_audio_length_ms"), ("temperature", "temperature")):
        field(browser, element_id, str(params[name]))
    browser.find_element(By.ID, "speak").click()
    wait(browser, "the stream's end", lambda: status(browser)["state"] in ("done", "error"))
    return status(browser)


def test_page_loads_self_contained_and_lists_voices(browser, server):
    response = httpx.get(server)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    assert "connect-src 'self'" in response.headers["content-security-policy"]
    assert "http://" not in response.text and "https://" not in response.text  # nothing fetched from elsewhere
    open_page(browser, server)
    assert browser.title.startswith("csm-train serve")
    assert status(browser)["state"] == "idle" and message(browser) == ""
    browser.refresh()  # the key is kept (localStorage): the picker fills without typing it again
    assert browser.find_element(By.ID, "key").get_attribute("value") == SERVE_KEY
    wait(browser, "the voice picker after a reload", lambda: "alloy" in voices(browser))


def test_speak_streams_what_the_api_sends(browser, server):
    expected = httpx.post(
        f"{server}/v1/audio/speech",
        headers={"Authorization": f"Bearer {SERVE_KEY}"},
        json={"model": "csm", "input": "Hello there.", "voice": "alloy", "response_format": "pcm", **SHORT},
        timeout=60,
    )
    assert expected.status_code == 200 and len(expected.content) == 5 * 1920 * 2
    open_page(browser, server)
    Select(browser.find_element(By.ID, "voice")).select_by_value("alloy")
    state = speak(browser, **SHORT)
    assert state["state"] == "done", message(browser)
    assert int(state["bytes"]) == len(expected.content)
    assert float(state["seconds"]) == pytest.approx(len(expected.content) / PCM_BYTES_PER_SECOND)
    assert int(state["first-audio-ms"]) >= 0 and state["audio"] == "running"  # scheduled on a playing context
    assert "done: 19200 bytes, 0.40 s" in browser.find_element(By.ID, "status").text


# The page's fetch, wrapped so the speech stream arrives in odd-sized pieces (a network may cut it anywhere).
RECHUNK = """
const real = window.fetch, size = arguments[0];
window.fetch = async (url, init) => {
  const response = await real(url, init);
  if (!String(url).endsWith("/v1/audio/speech") || !response.ok) return response;
  const reader = response.body.getReader();
  let pending = new Uint8Array(0);
  const body = new ReadableStream({ async pull(out) {
    while (pending.length < size) {
      const { done, value } = await reader.read();
      if (done) { if (pending.length) out.enqueue(pending); pending = new Uint8Array(0); return out.close(); }
      const joined = new Uint8Array(pending.length + value.length);
      joined.set(pending);
      joined.set(value, pending.length);
      pending = joined;
    }
    out.enqueue(pending.slice(0, size));
    pending = pending.slice(size);
  } });
  return new Response(body, { status: response.status, headers: response.headers });
};
"""


def test_odd_sized_pieces_lose_no_sample(browser, server):
    open_page(browser, server)
    browser.execute_script(RECHUNK, 1001)
    state = speak(browser, **SHORT)
    assert state["state"] == "done" and state["bytes"] == str(5 * 1920 * 2), message(browser)
    assert float(state["seconds"]) == pytest.approx(5 * 1920 / 24_000)  # every odd byte carried to the next piece


def test_bad_key_shows_the_servers_message(browser, server):
    open_page(browser, server)
    field(browser, "key", "sk-wrong", enter=True)
    wait(browser, "the voice list's refusal", lambda: message(browser) == "incorrect API key")
    state = speak(browser, **SHORT)
    assert state["state"] == "error" and state["bytes"] == "0"
    assert message(browser) == "incorrect API key"
    field(browser, "key", SERVE_KEY, enter=True)  # the next page load finds the right key


def test_upload_adds_a_voice(browser, server, tmp_path):
    clip = tmp_path / "clip.wav"
    t = np.arange(int(1.5 * 24_000)) / 24_000
    sf.write(clip, (0.3 * np.sin(2 * np.pi * 220 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))).astype(np.float32),
             24_000, subtype="PCM_16")  # fmt: skip
    name = f"playground-{uuid.uuid4().hex[:8]}"
    open_page(browser, server)
    form = browser.find_element(By.ID, "upload")
    form.find_element(By.NAME, "name").send_keys(name)
    form.find_element(By.NAME, "audio_sample").send_keys(str(clip))
    form.find_element(By.NAME, "transcript").send_keys("A steady hum.")
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    added = wait(browser, "the new voice", lambda: [v for k, v in voices(browser).items() if k.startswith(name)])
    (voice_id,) = added
    try:
        assert voice_id.startswith("voice_") and message(browser).startswith(f"added voice {name}")
        assert Select(browser.find_element(By.ID, "voice")).first_selected_option.get_attribute("value") == voice_id
        assert "alloy" in voices(browser)
        state = speak(browser, **SHORT)  # the picked upload is the request's voice
        assert state["state"] == "done" and state["bytes"] == str(5 * 1920 * 2), message(browser)
    finally:  # leave the session's voice store as it was
        httpx.delete(f"{server}/v1/audio/voices/{voice_id}", headers={"Authorization": f"Bearer {SERVE_KEY}"})
