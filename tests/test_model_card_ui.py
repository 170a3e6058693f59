"""The model card and the pipeline picture as a person sees them: rendered by the MLflow UI of a
real `mlflow server`, in headless Chromium. The screenshots are kept under build/test-artifacts/."""

from __future__ import annotations

import shutil
from pathlib import Path

import mlflow
import pytest
from support import EXAMPLE_TEXTS, tracking_uri

import mlflow_fullmodel as fm
from mlflow_fullmodel.card import summary
from mlflow_fullmodel.inspection import describe_model

pytestmark = pytest.mark.slow

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
SCREENSHOTS = Path(__file__).resolve().parents[1] / "build" / "test-artifacts"


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver; .ci/run does)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                     "--no-first-run", "--disable-background-networking", "--disable-component-update",
                     "--disable-sync", "--window-size=1400,1000"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def logged(tracking_server, text_model, tmp_path_factory):
    with tracking_uri(tracking_server.url):
        with mlflow.start_run() as run:
            info = fm.log_model(text_model, name="model", input_example=EXAMPLE_TEXTS, registered_model_name="carded")
        local = mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path_factory.mktemp("card")))
        version = mlflow.MlflowClient().get_model_version("carded", str(info.registered_model_version))
    return {"experiment": run.info.experiment_id, "model_id": info.model_id, "local": local, "version": version}


def open_artifact(driver, name: str):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    entry = WebDriverWait(driver, 60).until(
        lambda d: next(iter(d.find_elements(By.XPATH, f"//*[text()='{name}']")), None))
    entry.click()
    return WebDriverWait(driver, 30)


def test_the_card_and_the_picture_are_rendered_in_the_mlflow_ui(tracking_server, logged, browser):
    from selenium.webdriver.common.by import By

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    browser.get(f"{tracking_server.url}/#/experiments/{logged['experiment']}/models/{logged['model_id']}/artifacts")

    wait = open_artifact(browser, "MODEL_CARD.md")
    wait.until(lambda d: "Model card" in [h.text for h in d.find_elements(By.TAG_NAME, "h1")])
    headings = [h.text for h in browser.find_elements(By.TAG_NAME, "h2")]
    assert {"The data path", "Runtime parameters", "Golden example", "How to call it"} <= set(headings)
    page = browser.find_element(By.TAG_NAME, "body").text
    assert "mlflow_fullmodel.transforms.text:SentencePieceEncode" in page and "k=Param(1, minimum=1" in page
    browser.save_screenshot(str(SCREENSHOTS / "model-card.png"))

    wait = open_artifact(browser, "pipeline.svg")
    picture = wait.until(lambda d: next(
        (i for i in d.find_elements(By.TAG_NAME, "img")
         if i.get_attribute("src").startswith("blob:") and d.execute_script("return arguments[0].naturalWidth", i)),
        None))
    assert browser.execute_script("return arguments[0].naturalWidth", picture) >= 500
    browser.save_screenshot(str(SCREENSHOTS / "pipeline.png"))


def test_the_registered_version_describes_itself_with_the_cards_summary(logged):
    assert logged["version"].description == summary(describe_model(logged["local"]))
    assert logged["version"].description.startswith("A fullmodel MLflow model that turns `text` into `label`")
