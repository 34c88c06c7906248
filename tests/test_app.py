"""chest_mnist.app: the page's numbers are predict's, a bad file gets a message and the others
still work; in a real browser (Debian's Chromium driven by Playwright) and through Gradio's API.
The browser tests need `chromium` on the PATH: `make browser` installs it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from chest_mnist import UserError
from chest_mnist.analyser import Analyser, Analysis
from chest_mnist.app import bar_chart, serve, table
from chest_mnist.predict import predict
from tests.browser import AppDidNotStart, launch_chromium, running_app
from tests.conftest import PNEUMONIA_NPZ, compose_train


@pytest.fixture(scope="module")
def xrays(tmp_path_factory) -> dict[str, Path]:
    """Three real chest X-rays from PneumoniaMNIST's test split as PNGs, and a broken file."""
    folder = tmp_path_factory.mktemp("xrays")
    images = np.load(PNEUMONIA_NPZ)["test_images"]
    files = {}
    for i in range(3):
        files[f"xray{i}"] = folder / f"xray{i}.png"
        Image.fromarray(images[i]).save(files[f"xray{i}"])
    files["broken"] = folder / "x.png"
    files["broken"].write_bytes(np.random.default_rng(0).bytes(500))  # no image at all
    return files


@pytest.fixture(scope="module")
def predicted(trained_run, xrays, tmp_path_factory) -> dict:
    """predict's JSON on each good file alone, by file name: the reference for every number
    shown. Alone, as the page scores them: in a batch of several, the last bits can differ."""
    out = tmp_path_factory.mktemp("predict")
    rows = {}
    for name in ("xray0", "xray1", "xray2"):
        cfg = compose_train(
            [
                f"ckpt_path={trained_run}",
                f"inputs=[{xrays[name]}]",
                "format=json",
                f"output={out}/{name}.json",
                f"paths.output_dir={out}",
            ],
            "predict",
        )
        document = json.loads(predict(cfg)["output"].read_text())
        rows[f"{name}.png"] = document["predictions"][0]
    return document | {"rows": rows}


@pytest.fixture(scope="module")
def analyser(trained_run) -> Analyser:
    return Analyser(trained_run, device="cpu")


def test_analyse_gives_predicts_numbers(analyser, xrays, predicted):
    assert analyser.thresholds == predicted["thresholds"]
    assert analyser.thresholds_from == predicted["thresholds_from"]
    assert analyser.thresholds_from.startswith("tuned on validation")  # not the 0.5 fallback
    for name in ("xray0", "xray1", "xray2"):
        analysis = analyser.analyse(xrays[name])
        row = predicted["rows"][f"{name}.png"]
        assert analysis.error is None
        assert analysis.probabilities == row["probabilities"]  # to the float
        assert analysis.predicted == row["predicted"]
        assert analysis.pixels.shape == (28, 28)


def test_the_readmes_python_block_runs_as_written(trained_run, xrays, predicted, capsys):
    """README's "From Python" block, with a run and an X-ray of ours for its placeholders: the
    numbers are predict's, and the heatmap is one of the image's size."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = readme.split("## From Python", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert '"logs/train/runs/<run>"' in block and '"xray.png"' in block
    code = block.replace("logs/train/runs/<run>", str(trained_run))
    namespace: dict = {}
    exec(code.replace("xray.png", str(xrays["xray0"])), namespace)
    row = predicted["rows"]["xray0.png"]
    assert namespace["result"].probabilities == row["probabilities"]
    assert namespace["result"].predicted == row["predicted"]
    assert namespace["heatmap"].shape == (28, 28)
    assert str(row["probabilities"]) in capsys.readouterr().out


def test_a_file_that_cannot_be_used_gets_a_message_not_an_exception(analyser, xrays, tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    good = xrays["xray0"].read_bytes()
    (tmp_path / "cut.png").write_bytes(good[: len(good) // 2])
    reasons = {
        xrays["broken"]: "not an image Pillow can read",
        tmp_path / "empty.png": "empty file",
        tmp_path / "cut.png": "damaged or truncated image",
        tmp_path / "missing.png": "No such file",
    }
    for path, reason in reasons.items():
        analysis = analyser.analyse(path)
        assert reason in analysis.error, (path.name, analysis.error)
        assert analysis.probabilities == {} and analysis.pixels is None
        assert analysis.name == path.name


def test_the_heatmap_is_of_the_chosen_finding(analyser, xrays):
    pixels = analyser.analyse(xrays["xray0"]).pixels
    maps = [analyser.heatmap(pixels, label) for label in analyser.labels[:4]]
    assert all(m.shape == (28, 28) and m.min() >= 0 and m.max() <= 1 for m in maps)
    assert any(not np.array_equal(maps[0], m) for m in maps[1:])  # depends on the label


def test_a_multi_class_model_shows_its_arg_max_class_without_thresholds():
    analysis = Analysis(
        "x.png",
        probabilities={"normal": 0.25, "benign": 0.7, "malignant": 0.05},
        predicted=["benign"],
    )
    rows = table(analysis, None).splitlines()[2:]
    assert rows == [
        "| benign | 0.7000 | arg-max | yes |",
        "| normal | 0.2500 | arg-max |  |",
        "| malignant | 0.0500 | arg-max |  |",
    ]
    bars = bar_chart(analysis, None).axes[0]
    assert [t.get_text() for t in bars.get_yticklabels()] == ["malignant", "normal", "benign"]
    assert not bars.collections  # no threshold ticks


def test_no_checkpoint_is_a_usage_error():
    cfg = compose_train([], "app")
    assert cfg.host == "127.0.0.1"  # this machine only, unless told otherwise
    with pytest.raises(UserError, match="ckpt_path is missing"):
        serve(cfg)


@pytest.mark.parametrize("port", ["abc", "99999", "-1", "1.5"])
def test_a_bad_port_is_a_usage_error(port):
    """Checked before the checkpoint loads: Gradio's TypeError or OverflowError otherwise."""
    cfg = compose_train(["ckpt_path=/no/such.ckpt", f"port={port}"], config_name="app")
    with pytest.raises(UserError, match=f"port={cfg.port!r} must be a whole number from 1 to"):
        serve(cfg)


# --- the page in a browser, and the API: one server for the module ---------------------------


@pytest.fixture(scope="module")
def server(trained_run, tmp_path_factory):
    """`python -m chest_mnist.app` on a free port, as a user starts it; stopped at the end."""
    try:
        with running_app(trained_run, tmp_path_factory.mktemp("server") / "app.log") as url:
            yield url
    except AppDidNotStart as e:
        pytest.fail(str(e))


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        try:
            browser = launch_chromium(playwright)
        except FileNotFoundError as e:
            pytest.fail(str(e))
        yield browser
        browser.close()


def upload(browser, url: str, files: list[Path]):
    """A new page with `files` dropped on it, once every file's panel is there; `page.asked`
    lists every URL the page requested."""
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    page.asked = []
    page.on("request", lambda request: page.asked.append(request.url))
    page.goto(url)
    page.locator("input[type=file]").set_input_files([str(f) for f in files])
    page.locator(".result").nth(len(files) - 1).wait_for(timeout=60_000)
    return page


def shown_rows(panel) -> dict[str, list[str]]:
    """The probability table of one file's panel: label -> [probability, threshold, predicted]."""
    rows = panel.locator(".block.probabilities table tbody tr")
    rows.first.wait_for()  # the panel can be there a moment before its table
    cells = [row.locator("td").all_inner_texts() for row in rows.all()]
    return {label.strip(): [c.strip() for c in rest] for label, *rest in cells}


@pytest.mark.slow
def test_the_page_shows_predicts_numbers(server, browser, xrays, predicted, tmp_path):
    page = upload(browser, server, [xrays["xray0"], xrays["xray1"]])
    assert "Not for clinical use" in page.locator("body").inner_text()
    for name in ("xray0", "xray1"):
        panel = page.locator(".result", has_text=f"{name}.png")
        row = predicted["rows"][f"{name}.png"]
        shown = shown_rows(panel)
        assert set(shown) == set(predicted["labels"])
        for label, (probability, threshold, mark) in shown.items():
            assert float(probability) == pytest.approx(row["probabilities"][label], abs=5e-5)
            assert float(threshold) == pytest.approx(predicted["thresholds"][label], abs=5e-5)
            assert (mark == "yes") == (label in row["predicted"])
        listed = [float(v[0]) for v in shown.values()]
        assert listed == sorted(listed, reverse=True)  # the most probable first

    # a click on another finding draws its heatmap
    panel = page.locator(".result", has_text="xray0.png")
    heatmap = panel.locator(".heatmap img")
    before = heatmap.get_attribute("src")
    second = list(shown_rows(panel))[1]
    panel.get_by_label(second, exact=True).check()
    page.wait_for_function(
        "([img, before]) => img.getAttribute('src') !== before",
        arg=[heatmap.element_handle(), before],
        timeout=30_000,
    )
    page.screenshot(path=tmp_path / "page.png", full_page=True)
    assert (tmp_path / "page.png").stat().st_size > 10_000
    elsewhere = [u for u in page.asked if not u.startswith((server, "data:", "blob:"))]
    assert page.asked and not elsewhere  # a local page: nothing from the internet
    page.close()


@pytest.mark.slow
def test_a_broken_file_gets_a_message_and_the_others_still_work(server, browser, xrays):
    page = upload(browser, server, [xrays["broken"], xrays["xray2"]])
    broken = page.locator(".result", has_text="x.png")
    assert "Cannot use this file: not an image Pillow can read" in broken.inner_text()
    assert shown_rows(page.locator(".result", has_text="xray2.png"))  # still predicted
    page.close()


@pytest.mark.slow
def test_the_api_returns_predicts_probabilities(server, xrays, predicted):
    from gradio_client import Client, handle_file

    client = Client(server, verbose=False)
    answer = client.predict(handle_file(str(xrays["xray1"])), api_name="/predict")
    row = predicted["rows"]["xray1.png"]
    assert answer["probabilities"] == row["probabilities"]  # JSON keeps every digit
    assert answer["predicted"] == row["predicted"]
    assert answer["thresholds"] == predicted["thresholds"]
    answer = client.predict(handle_file(str(xrays["broken"])), api_name="/predict")
    assert answer["error"] == "not an image Pillow can read" and answer["probabilities"] is None
