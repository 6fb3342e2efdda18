"""The status page in a real headless browser (Debian's chromium + chromedriver, via Selenium):
it loads, shows the replicas and the ring, and follows an /add, a weight change and a replica
kill by itself.

Without chromium these tests skip with the reason; under CI (``CI=true``) they fail instead.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from lb.backends.local import ENV_TOKEN
from tests.conftest import RunningStack, unavailable

pytestmark = pytest.mark.system

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1280,900")
WAIT = 60.0  # seconds: generous, the machine is shared


def _missing() -> list[str]:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package (pip install -e '.[ops]')")
    return missing


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    missing = _missing()
    if missing:
        reason = (f"no headless browser: {', '.join(missing)} missing "
                  "(apt-get install -y chromium chromium-driver)")
        unavailable(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver: Any, what: str, check: Callable[[Any], Any]) -> Any:
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, WAIT, poll_frequency=0.2).until(check)
    except TimeoutException:
        raise AssertionError(f"the page never showed {what}:\n{rows(driver)}") from None


def rows(driver: Any) -> dict[str, dict[str, str]]:
    """The replica table as the page shows it: hostname -> column -> text."""
    return driver.execute_script("""
        const head = [...document.querySelectorAll('#replicas thead th')].map(th => th.textContent);
        const out = {};
        for (const tr of document.querySelectorAll('#replicas tbody tr')) {
          const cells = [...tr.children].map(td => td.textContent.trim());
          out[tr.dataset.hostname] = Object.fromEntries(head.map((h, i) => [h, cells[i]]));
        }
        return out;""")


def arcs_of(driver: Any) -> set[str]:
    """Server ids that own an arc of the ring picture."""
    return set(driver.execute_script(
        "return [...document.querySelectorAll('#ring [data-server-id]')]"
        ".map(e => e.getAttribute('data-server-id'));"))


def kill_replica(token: str) -> None:
    for proc in psutil.process_iter(["environ"], ad_value=None):
        if (proc.info["environ"] or {}).get(ENV_TOKEN) == token:
            try:
                os.kill(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_status_page_follows_add_and_a_replica_kill(stack: RunningStack, browser: Any,
                                                    tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    browser.get(stack.url + "/_lb/status")
    assert "hashlb" in browser.title
    wait_for(browser, "a live update", lambda d: d.find_element(By.ID, "updated")
             .text.startswith("live"))
    shown = rows(browser)
    assert list(shown) == ["Server1", "Server2", "Server3"]
    assert all(r["state"] == "ready" for r in shown.values())
    assert [r["server id"] for r in shown.values()] == ["1", "2", "3"]
    assert [r["weight"] for r in shown.values()] == ["1", "1", "1"]
    assert sum(int(r["slots owned"]) for r in shown.values()) == 512
    assert arcs_of(browser) == {"1", "2", "3"}
    browser.execute_script("window.notReloaded = true;")  # updates come without a reload

    reply = stack.post("/add", json={"n": 1, "hostnames": ["S9"]})
    assert reply.status_code == 200, reply.text
    wait_for(browser, "S9 ready", lambda d: rows(d).get("S9", {}).get("state") == "ready")
    assert browser.find_element(By.ID, "n").text == "4"
    assert rows(browser)["S9"]["server id"] == "4"
    wait_for(browser, "S9's arcs", lambda d: "4" in arcs_of(d))
    reply = stack.post("/weight", json={"weights": {"S9": 2, "Server3": 0}})
    assert reply.status_code == 200, reply.text
    wait_for(browser, "the new weights", lambda d: (rows(d)["S9"]["weight"],
                                                    rows(d)["Server3"]["weight"])
             == ("2", "0 drained"))
    assert rows(browser)["Server3"]["share"] == "0.0%"
    reply = stack.post("/weight", json={"weights": {"Server3": 1}})
    assert reply.status_code == 200, reply.text

    victim = next(r for r in stack.state().members() if r.hostname == "Server2")
    assert victim.handle
    kill_replica(victim.handle.split("/", 1)[1])

    def replaced(d: Any) -> bool:
        shown = rows(d)
        new = [h for h, r in shown.items() if r["server id"] == "2" and h != "Server2"]
        return "Server2" not in shown and len(new) == 1 and shown[new[0]]["state"] == "ready"

    wait_for(browser, "Server2 replaced by a new replica with server id 2", replaced)
    assert browser.execute_script("return window.notReloaded === true;")
    assert len(rows(browser)) == 4
    wait_for(browser, "every arc back", lambda d: arcs_of(d) == {"1", "2", "3", "4"})
    browser.save_screenshot(str(tmp_path / "status.png"))
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == []
