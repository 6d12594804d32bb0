"""The live dashboard: its access rules, its snapshot, and the page itself in a real headless Chromium."""

from __future__ import annotations

import json
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from aggregator_helpers import ENROLL, REPO, ServerProcess, write_yaml_config

from aggregator.dashboard import Dashboard, DashboardConfig, parse_address
from prufed.common.errors import ConfigError

SCREENSHOT_DIR = REPO / "runs" / "screenshots"


def test_off_loopback_needs_tls_and_token():
    with pytest.raises(ConfigError, match="--dashboard"):
        DashboardConfig("0.0.0.0", 8080)
    with pytest.raises(ConfigError, match="TLS"):
        DashboardConfig("0.0.0.0", 8080, token="enroll-secret-123")
    assert DashboardConfig("127.0.0.1", 0).token is None
    assert DashboardConfig("localhost", 0).host == "localhost"
    with pytest.raises(ConfigError, match="HOST:PORT"):
        parse_address("8080")
    assert parse_address("[::1]:8080") == ("::1", 8080)


def test_token_guards_page_and_api():
    board = Dashboard(DashboardConfig("127.0.0.1", 0, token="s3cret-token"), lambda: {"ok": 1}).start()
    try:
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{board.url}api/snapshot", timeout=10)
        assert refused.value.code == 401
        request = urllib.request.Request(f"{board.url}api/snapshot", headers={"Authorization": "Bearer s3cret-token"})
        assert json.loads(urllib.request.urlopen(request, timeout=10).read()) == {"ok": 1}
        page = urllib.request.urlopen(f"{board.url}?token=s3cret-token", timeout=10).read().decode()
        assert "<title>PruFed aggregator</title>" in page
    finally:
        board.stop()


def _chromium():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (browser and driver):
        pytest.fail("Chromium not found: install the Debian packages chromium and chromium-driver", pytrace=False)
    options = Options()
    options.binary_location = browser
    # Headless, and no background traffic: this machine reaches nothing but loopback.
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options)


def _wait(predicate, timeout: float = 60.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_page_in_chromium_during_a_federation(tmp_path, tiny_model_dir):
    from selenium.webdriver.common.by import By

    from edge_client.transport import AggregatorClient, FatalError

    config = write_yaml_config(tmp_path / "agg.yaml", rounds=3, min_clients=2)
    server = ServerProcess(f"sqlite:///{tmp_path / 'agg.db'}", tiny_model_dir, config,
                           extra_args=("--dashboard", "127.0.0.1:0"))
    driver = None
    try:
        url = _wait(lambda: next((line.split()[-1] for line in server.log if line.startswith("dashboard on ")), None),
                    what="the dashboard's address")
        assert url.startswith("http://127.0.0.1:")
        layer_sets = ([0, 1, 2, 3, 4, 5, 6, 7], [0, 1, 2, 7])
        clients = [AggregatorClient(server.address) for _ in layer_sets]
        for client, layers in zip(clients, layer_sets):
            client.register(ENROLL, layers)
        with pytest.raises(FatalError):  # one refusal of a known code, which the page must count
            AggregatorClient(server.address).register("wrong-enrolment-token", [0, 1])
        for i, (client, layers) in enumerate(zip(clients, layer_sets)):
            _wait(lambda c=client: c.pull_task().kind == "task", what="round 1's task")
            tensors, _meta, _version = client.download_global()
            client.upload_update({k: torch.full_like(v, 0.01 * (i + 1)) for k, v in tensors.items()}, 1, 10 + i,
                                 layers, eval=(2.5 + i, 4))  # federated evaluation: (loss, examples scored)
        _wait(lambda: clients[0].status()["rounds_closed"] >= 1, what="round 1 to close")

        driver = _chromium()
        driver.get(url)  # the federation is still running: round 2 is open and waiting for uploads
        rounds = _wait(lambda: "closed" in (text := driver.find_element(By.ID, "rounds").text) and text,
                       what="the rounds table")
        assert "open" in rounds  # round 2
        depths = driver.find_element(By.ID, "depths").text
        assert "8 2" not in depths and "8 1" in depths and "4 1" in depths  # one client at 8 layers, one at 4
        traffic = driver.find_element(By.ID, "traffic").text
        assert "uploads accepted 2" in traffic
        refusals = driver.find_element(By.ID, "refusals").text
        assert "unauthenticated 1" in refusals.lower()
        assert "global version 1" in driver.find_element(By.ID, "summary").text
        assert driver.find_element(By.ID, "loss-title").text.startswith("Federated-evaluation loss")
        lines = driver.find_elements(By.CSS_SELECTOR, "#loss polyline")
        assert sorted(line.get_attribute("data-depth") for line in lines) == ["4", "8"]  # one line per depth
        assert "8 layers: 2.500" in driver.find_element(By.ID, "loss-legend").text
        SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
        shot = Path(SCREENSHOT_DIR / "dashboard.png")
        assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    finally:
        if driver is not None:
            driver.quit()
        server.kill()
