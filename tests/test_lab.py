"""`make lab`: the kernel it registers runs this environment's Python, papermill and a real JupyterLab in
Chromium run the experiments notebook with it; executed notebooks also become HTML pages."""
import json
import os
import re
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

from bnet_fastai.app.lab import KERNEL_NAME, register_kernel, with_defaults
from bnet_fastai.app.notebooks import NOTEBOOKS, export_html

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
DISPLAY_NAME = f"{KERNEL_NAME} ({Path(sys.prefix).name})"
SAMPLE = dict(DATASET="sample", PROFILE="quick", EXPERIMENT="lab-smoke")


@pytest.fixture
def jupyter_env(tmp_path, monkeypatch) -> dict:
    """Jupyter's and the package's folders all under tmp_path: nothing lands in ~, the repo or the venv."""
    env = dict(JUPYTER_DATA_DIR=tmp_path / "data_dir", JUPYTER_CONFIG_DIR=tmp_path / "config",
               JUPYTER_RUNTIME_DIR=tmp_path / "runtime", IPYTHONDIR=tmp_path / "ipython",
               JUPYTER_PATH=tmp_path / "prefix" / "share" / "jupyter",  # where the kernel is registered
               BNET_FASTAI_DATA=tmp_path / "data", BNET_FASTAI_RESULTS=tmp_path / "results")
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))
    return {key: str(value) for key, value in env.items()}


def notebook_copy(folder: Path, code_cells: int | None = None, kernel: str | None = KERNEL_NAME,
                  **parameters) -> Path:
    """experiments.ipynb copied into `folder`: parameters cell edited, kernel set to `kernel` (None: the
    committed notebook's own)."""
    nb = nbformat.read(NOTEBOOKS / "experiments.ipynb", as_version=4)
    if code_cells is not None:  # keep everything up to the `code_cells`-th code cell
        last = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"][code_cells - 1]
        nb.cells = nb.cells[:last + 1]
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    for name, value in parameters.items():
        cell.source, n = re.subn(rf"^{name} = .*$", f"{name} = {value!r}", cell.source, flags=re.M)
        assert n == 1, name
    if kernel is not None:
        nb.metadata.kernelspec = dict(name=kernel, display_name=DISPLAY_NAME, language="python")
    folder.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, folder / "experiments.ipynb")
    return folder / "experiments.ipynb"


def test_lab_defaults_to_the_notebooks_on_localhost_and_yields_to_given_options():
    assert with_defaults(["--no-browser"]) == [f"--ServerApp.root_dir={NOTEBOOKS}", "--ServerApp.ip=127.0.0.1",
                                               "--no-browser"]
    given = ["--ip", "0.0.0.0", "--notebook-dir=/srv/nb"]
    assert with_defaults(given) == given  # jupyter rejects an option given twice


def test_committed_notebooks_run_with_papermill_where_no_kernel_was_registered(tmp_path, jupyter_env):
    """The README's papermill example in an environment that has the package and nothing registered: the
    notebooks name `python3`, which every Jupyter has, and jupyter_client starts it with this Python."""
    import papermill
    from jupyter_client.kernelspec import KernelSpecManager

    for name in ("experiments.ipynb", "batchnorm_basics.ipynb"):
        assert nbformat.read(NOTEBOOKS / name, as_version=4).metadata.kernelspec.name == "python3"
    assert KERNEL_NAME not in KernelSpecManager().find_kernel_specs()  # nothing of ours registered here
    nb = notebook_copy(tmp_path / "nb", code_cells=2, kernel=None)
    nb_node = nbformat.read(nb, as_version=4)
    nb_node.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.executable)"))
    nbformat.write(nb_node, nb)
    executed = papermill.execute_notebook(str(nb), str(tmp_path / "out.ipynb"), parameters=SAMPLE,
                                          cwd=str(tmp_path), progress_bar=False)  # no kernel_name given
    text = "".join(o.get("text", "") for c in executed.cells for o in c.get("outputs", []))
    assert "dataset: sample | profile: quick" in text
    assert text.rstrip().splitlines()[-1] == sys.executable


def test_registered_kernel_runs_this_python_and_executes_the_notebook(tmp_path, jupyter_env):
    import papermill
    from jupyter_client.kernelspec import KernelSpecManager

    folder = register_kernel(tmp_path / "prefix")
    assert folder == Path(jupyter_env["JUPYTER_PATH"]) / "kernels" / KERNEL_NAME
    spec = json.loads((folder / "kernel.json").read_text())
    assert spec["argv"][0] == sys.executable and spec["display_name"] == DISPLAY_NAME
    assert Path(KernelSpecManager().get_kernel_spec(KERNEL_NAME).resource_dir) == folder
    assert not (Path(jupyter_env["JUPYTER_DATA_DIR"]) / "kernels").exists()  # nothing registered per user

    nb = notebook_copy(tmp_path / "nb", code_cells=2)  # parameters, then the cell describing the study
    nb_node = nbformat.read(nb, as_version=4)
    nb_node.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.executable)"))
    nbformat.write(nb_node, nb)
    executed = papermill.execute_notebook(str(nb), str(tmp_path / "out.ipynb"), parameters=SAMPLE,
                                          kernel_name=KERNEL_NAME, cwd=str(tmp_path), progress_bar=False)
    text = "".join(o.get("text", "") for c in executed.cells for o in c.get("outputs", []))
    assert "dataset: sample | profile: quick" in text
    assert str(Path(jupyter_env["BNET_FASTAI_RESULTS"]) / "lab-smoke") in text
    assert text.rstrip().splitlines()[-1] == sys.executable


def test_export_html_writes_the_executed_notebook_next_to_it(tmp_path):
    from nbclient import NotebookClient

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# Tiny study"),
                                         nbformat.v4.new_code_cell("print(6 * 7, 'from the kernel')")])
    NotebookClient(nb, kernel_name="python3", timeout=120).execute()
    nbformat.write(nb, tmp_path / "tiny.ipynb")
    page = export_html(tmp_path / "tiny.ipynb")
    assert page == tmp_path / "tiny.html"
    html = page.read_text(encoding="utf-8")
    assert html.lstrip().lower().startswith("<!doctype html>")
    assert "42 from the kernel" in html and "Tiny study" in html
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.html", "tiny.ipynb"]  # no temporary file left


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def lab_server(tmp_path, jupyter_env):
    """`python -m bnet_fastai.app.lab` (what `make lab` runs) serving a temp copy of the notebooks; yields its URL."""
    root = notebook_copy(tmp_path / "notebooks", **SAMPLE).parent
    port, token = free_port(), secrets.token_hex(16)
    is_root = os.geteuid() == 0  # jupyter refuses to run as root unless told to (CI containers run as root)
    log = open(tmp_path / "lab.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "bnet_fastai.app.lab", "--kernel-prefix", str(tmp_path / "prefix"), "--no-browser",
         f"--port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
         f"--ServerApp.root_dir={root}", "--LabApp.news_url=None",
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate", *(["--allow-root"] * is_root)],
        env={**os.environ, **jupyter_env}, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            assert server.poll() is None, (tmp_path / "lab.log").read_text()
            try:
                urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=5)
                break
            except OSError:
                assert time.time() < deadline, (tmp_path / "lab.log").read_text()
                time.sleep(1)
        yield f"{base}/lab/tree/experiments.ipynb?token={token}"
    finally:
        server.terminate()  # jupyter_server shuts its kernels down on SIGTERM
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


@pytest.fixture
def browser(tmp_path):
    """Debian's headless Chromium driven by its chromedriver."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--window-size=1400,1000", f"--user-data-dir={tmp_path / 'chromium'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.mark.slow
@pytest.mark.skipif(not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
                    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
def test_jupyterlab_runs_the_notebook_with_the_project_kernel_in_a_browser(tmp_path, lab_server, browser):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    committed = (NOTEBOOKS / "experiments.ipynb").read_bytes()
    wait = WebDriverWait(browser, 180)
    try:
        browser.get(lab_server)
        kernel = (By.CSS_SELECTOR, ".jp-NotebookPanel-toolbar .jp-Toolbar-kernelName")
        wait.until(ec.text_to_be_present_in_element(kernel, DISPLAY_NAME))
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".jp-Notebook-ExecutionIndicator")
                   .get_attribute("data-status") == "idle")
        parameters = wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, ".jp-CodeCell .jp-InputPrompt")))
        parameters.click()  # selects the parameters cell in command mode
        ActionChains(browser).key_down(Keys.SHIFT).send_keys(Keys.ENTER, Keys.ENTER).key_up(Keys.SHIFT).perform()
        def output_text(driver) -> str:  # every output area; stderr (e.g. tqdm's warning) is one of its own
            return "\n".join(e.text for e in driver.find_elements(By.CSS_SELECTOR, ".jp-OutputArea-output"))

        wait.until(lambda d: "dataset: sample" in output_text(d))
        text = output_text(browser)
        assert "dataset: sample | profile: quick" in text and "lab-smoke" in text  # the temp copy's parameters
    except Exception:
        browser.save_screenshot(str(tmp_path / "jupyterlab.png"))
        print(f"screenshot: {tmp_path / 'jupyterlab.png'}; server log: {tmp_path / 'lab.log'}")
        raise
    assert (NOTEBOOKS / "experiments.ipynb").read_bytes() == committed
