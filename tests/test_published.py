"""The README's published Results are what `report` computes from the committed run folders."""
from pathlib import Path

from bnet_fastai.report import report, results_markdown

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "docs" / "fashion-mnist-cpu"


def test_readme_results_equal_the_report_of_the_committed_study(tmp_path):
    tables = report(STUDY, out=tmp_path)  # figures and CSVs to tmp_path: the committed folder stays as it is
    assert len(tables["skipped"]) == 0
    assert tables["history"]["run_id"].nunique() == 30 and (tables["summary"]["n_seeds"] == 5).all()
    readme = (ROOT / "README.md").read_text()
    published = readme.split("<!-- results:start -->")[1].split("<!-- results:end -->")[0]
    assert results_markdown(tables).strip() == published.strip()
    for png in ("curves.png", "final_accuracy.png", "kernels.png"):
        assert (STUDY / png).read_bytes()[:4] == b"\x89PNG" and f"docs/fashion-mnist-cpu/{png}" in readme
