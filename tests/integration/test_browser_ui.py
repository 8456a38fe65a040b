"""/ui and /docs in a real browser: Debian's chromium (headless) driven by chromedriver through
selenium, against a live uda-serve serving a task trained by `uda-train`. The playground
uploads an image and shows the top-k the server answers; a bad upload shows the server's error;
/docs renders the API; every request either page makes goes to the server on loopback.
Screenshots are saved under $UDA_TEST_ARTIFACTS (default: test-artifacts/ at the repository
root). `make test` installs chromium and chromium-driver (scripts/ensure-chromium.sh)."""
from __future__ import annotations

import base64
import json
import os
import shutil
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from server.config import ServeConfig
from server.embedded import EmbeddedServer
from trainer import cli as train_cli
from trainer.demo import make_shapes_world

webdriver = pytest.importorskip("selenium.webdriver", reason="pip install -e '.[dev]' (selenium)")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ARTIFACTS = Path(os.environ.get("UDA_TEST_ARTIFACTS", Path(__file__).parents[2] / "test-artifacts"))
TRAIN_FLAGS = ["--model", "uda-tiny-vit", "--pretrained", "random", "--epochs", "1",
               "--iters-per-epoch", "4", "--batch-size", "8", "--lr", "1e-3", "--workers", "0",
               "--device", "cpu", "--method", "cmkd", "--rst", "--tau", "1e-4"]
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def _binaries() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        if os.environ.get("CI") == "true":
            pytest.fail("chromium or chromedriver missing: run scripts/ensure-chromium.sh")
        pytest.skip("chromium or chromedriver missing: run scripts/ensure-chromium.sh (make test does)")
    return chromium, driver


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A task trained and published through `uda-train`, and the shapes world it came from."""
    root = tmp_path_factory.mktemp("browser")
    world = make_shapes_world(root / "data", per_class=3, size=40)
    store = str(root / "store")
    code = train_cli.main(["--source", str(world["photo"]), "--target", str(world["sketch"]),
                           *TRAIN_FLAGS, "--workdir", str(root / "run"), "--publish", store,
                           "--task", "photo2sketch"])
    assert code == 0
    return store, world


@pytest.fixture(scope="module")
def server(trained):
    store, _ = trained
    cfg = ServeConfig(model="uda-tiny-vit", pretrained="random", store=store, port=0, max_batch=8)
    with EmbeddedServer(cfg) as srv:
        yield srv


@pytest.fixture(scope="module")
def browser():
    chromium, driver = _binaries()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1100,800", "--disable-background-networking",
                "--disable-component-update", "--no-first-run"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    service = webdriver.ChromeService(executable_path=driver)
    browser = webdriver.Chrome(options=options, service=service)
    browser.set_page_load_timeout(60)
    yield browser
    browser.quit()


def requested_urls(browser) -> list[str]:
    """Every URL the page asked for since the last call (Chrome's DevTools network log)."""
    urls = []
    for entry in browser.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def assert_all_local(urls: list[str]) -> None:
    assert urls, "the network log is empty: nothing was recorded"
    remote = [u for u in urls if urlsplit(u).scheme not in ("data", "blob")
              and urlsplit(u).hostname not in LOOPBACK]
    assert not remote, f"requests left the machine: {remote}"


def save(browser, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    assert browser.save_screenshot(str(path)), path
    return path


def wait(browser, seconds: float = 60):
    return WebDriverWait(browser, seconds)


def test_playground_predicts_uploaded_images(browser, server, trained):
    _, world = trained
    images = [sorted((world["sketch"] / shape).iterdir())[0] for shape in ("triangle", "circle")]
    browser.get(f"{server.url}/ui")
    wait(browser).until(lambda b: b.find_element(By.ID, "task").get_attribute("data-loaded") == "true")
    Select(browser.find_element(By.ID, "task")).select_by_value("photo2sketch")
    top_k = browser.find_element(By.ID, "top-k")
    top_k.clear()
    top_k.send_keys("3")
    browser.find_element(By.ID, "files").send_keys("\n".join(str(p) for p in images))
    browser.find_element(By.ID, "predict").click()
    wait(browser).until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "tr.prediction")) == 6)

    tables = browser.find_elements(By.CSS_SELECTOR, ".result table")
    assert [t.get_attribute("data-image") for t in tables] == [p.name for p in images]
    with httpx.Client(base_url=server.url, timeout=60) as http:
        answer = http.post("/predict", params={"task": "photo2sketch", "top_k": 3},
                           files=[("file", (p.name, p.read_bytes(), "image/png")) for p in images]).json()
    for table, prediction in zip(tables, answer["predictions"]):
        rows = table.find_elements(By.CSS_SELECTOR, "tr.prediction")
        shown = [(r.find_element(By.CSS_SELECTOR, "td.label").text,
                  float(r.find_element(By.CSS_SELECTOR, "td.score").text)) for r in rows]
        top = prediction["top_k"]
        assert [label for label, _ in shown] == [c["label"] for c in top]
        assert all(abs(score - c["score"]) < 1e-4 for (_, score), c in zip(shown, top))
        bar = rows[0].find_element(By.CSS_SELECTOR, ".bar").value_of_css_property("width")
        assert float(bar.removesuffix("px")) > 0
    latency = browser.find_element(By.ID, "latency")
    assert float(latency.get_attribute("data-ms")) > 0 and "photo2sketch v1" in latency.text
    assert browser.find_element(By.ID, "error").get_attribute("hidden") is not None
    assert_all_local(requested_urls(browser))
    assert save(browser, "ui-playground.png").stat().st_size > 10_000


_DROP = """
const bytes = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));
const data = new DataTransfer();
data.items.add(new File([bytes], arguments[1], {type: "image/png"}));
document.getElementById("drop").dispatchEvent(
  new DragEvent("drop", {dataTransfer: data, bubbles: true, cancelable: true}));
"""


def test_playground_takes_a_dropped_image(browser, server, trained):
    _, world = trained
    image = sorted((world["photo"] / "square").iterdir())[0]
    browser.get(f"{server.url}/ui")
    wait(browser).until(lambda b: b.find_element(By.ID, "task").get_attribute("data-loaded") == "true")
    browser.execute_script(_DROP, base64.b64encode(image.read_bytes()).decode(), image.name)
    assert browser.find_element(By.ID, "chosen").text == image.name
    browser.find_element(By.ID, "predict").click()
    wait(browser).until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "tr.prediction")) == 4)
    table = browser.find_element(By.CSS_SELECTOR, ".result table")
    assert table.get_attribute("data-image") == image.name
    with httpx.Client(base_url=server.url, timeout=60) as http:
        answer = http.post("/predict?task=photo2sketch", files={"file": (image.name, image.read_bytes())}).json()
    labels = [e.text for e in table.find_elements(By.CSS_SELECTOR, "td.label")]
    assert labels == [c["label"] for c in answer["predictions"][0]["top_k"]]


def test_playground_shows_the_servers_error(browser, server, tmp_path):
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("these are notes, not pixels")
    browser.get(f"{server.url}/ui")
    wait(browser).until(lambda b: b.find_element(By.ID, "task").get_attribute("data-loaded") == "true")
    browser.find_element(By.ID, "files").send_keys(str(not_an_image))
    browser.find_element(By.ID, "predict").click()
    error = browser.find_element(By.ID, "error")
    wait(browser).until(lambda b: error.get_attribute("hidden") is None and error.text)
    with httpx.Client(base_url=server.url, timeout=60) as http:
        body = http.post("/predict?task=photo2sketch", files={"file": ("notes.png", not_an_image.read_bytes())}).json()
    assert error.text == f"415 {body['error']}: {body['detail']}"
    assert not browser.find_elements(By.CSS_SELECTOR, "tr.prediction")
    save(browser, "ui-playground-error.png")


def test_docs_render_the_api_from_local_assets(browser, server):
    requested_urls(browser)  # drop what the earlier pages logged
    browser.get(f"{server.url}/docs")
    wait(browser).until(lambda b: len(b.find_elements(By.CSS_SELECTOR, ".opblock")) > 10)
    paths = {e.text for e in browser.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")}
    assert {"/predict", "/v2/models/{task}/infer", "/v2", "/tasks"} <= paths, paths
    urls = requested_urls(browser)
    assert any(u.endswith("/openapi.json") for u in urls) and any("swagger-ui-bundle.js" in u for u in urls)
    assert_all_local(urls)
    save(browser, "docs.png")


def test_docs_switched_off_leaves_the_playground(trained):
    store, _ = trained
    cfg = ServeConfig(model="uda-tiny-vit", pretrained="random", store=store, port=0, docs=False)
    with EmbeddedServer(cfg) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        assert http.get("/docs").status_code == 404
        assert http.get("/docs/assets/swagger-ui-bundle.js").status_code == 404
        assert http.get("/openapi.json").status_code == 200
        page = http.get("/ui")
        assert page.status_code == 200 and 'src="/ui/static/app.js"' in page.text
        script = http.get("/ui/static/app.js")
        assert script.status_code == 200 and "javascript" in script.headers["content-type"]
