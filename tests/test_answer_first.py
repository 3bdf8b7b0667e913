"""The answer where a newcomer looks (issue 36): the plain report and the study lead with BNET − BN and its
verdict, say when the seeds can never decide, and `run --help` / `sweep --help` say what each option is."""
import dataclasses
import shutil
from pathlib import Path

import pandas as pd
import pytest

from bnet_fastai.analysis.stats import seeds_needed
from bnet_fastai.app.cli import build_parser, main
from bnet_fastai.runs.config import FIELD_HELP, RunConfig
from bnet_fastai.sweeps.study import resolve

PUBLISHED = Path(__file__).parents[1] / "docs" / "fashion-mnist-cpu"


@pytest.mark.parametrize("family,needed", [(1, 6), (4, 8), (12, 9), (23, 10), (25, 10), (40, 11)])
def test_seeds_needed_by_hand(family, needed):
    # n seeds decide only if 2/2^n · m < 0.05 (the smallest exact p, Holm's first step)
    assert 2 / 2 ** needed * family < 0.05 <= 2 / 2 ** (needed - 1) * family
    assert seeds_needed(family) == needed


@pytest.fixture
def published(tmp_path):
    """The committed 5-seed CPU study (30 runs), copied: report writes its tables beside the runs."""
    out = tmp_path / "cpu"
    shutil.copytree(PUBLISHED, out, ignore=shutil.ignore_patterns("*.pth", "events.*"))
    return out


def test_the_plain_report_leads_with_the_answer(published, capsys):
    assert main(["report", str(published)]) == 0
    lines = capsys.readouterr().out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("note: with 5 paired seeds"))
    assert "Holm over the 4 comparisons needs it below 0.05/4; 8 seeds at least" in lines[start]
    assert lines[start + 1].startswith("BNET - BN, final test accuracy, same epochs")
    assert lines.index("Per arm:") == start + 6  # the four comparisons come before any per-arm table
    paired = pd.read_csv(published / "paired.csv")
    r = paired[(paired.arch == "xmininet") & (paired.variant == "bnet-k3-all")].iloc[0]
    mine = next(line for line in lines if line.startswith("  xmininet bnet-k3-all at 5 epochs: "))
    assert mine == (f"  xmininet bnet-k3-all at 5 epochs: {100 * r.final_accuracy_diff_mean:+.2f} pt "
                    f"[{100 * r.final_accuracy_diff_ci_low:+.2f}, {100 * r.final_accuracy_diff_ci_high:+.2f}], "
                    f"p {r.final_accuracy_p:.2g} (Holm {r.p_holm:.2g}): cannot tell, kept 5/5 [5 seeds]")
    assert r.final_accuracy_p == 2 / 2 ** 5  # every seed on BNET's side: the smallest p five seeds can give


def test_a_study_says_up_front_when_its_seeds_cannot_decide():
    study = resolve("fashion-mnist", "cpu")  # 2 archs × 2 BNET variants, 5 seeds
    assert "note: 5 seeds can never reach a verdict here" in study.describe()
    assert "Holm over the 4 BNET-vs-BN comparisons needs 8 seeds at least (--seeds 0,...,7" in study.seeds_note
    assert resolve("fashion-mnist", "cpu", seeds=list(range(8))).seeds_note == ""
    assert resolve("fashion-mnist", "convergence").seeds_note == ""  # 12 comparisons, 20 seeds (9 needed)


@pytest.mark.parametrize("command", ["run", "sweep"])
def test_help_says_what_every_option_is_and_its_choices(command, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(RunConfig):
        assert f"{' '.join(FIELD_HELP[f.name].split())} (default: {f.default})" in text, f.name
    assert "one of adam, ranger, sgd" in text and "one of all, last" in text and "one of one_cycle, flat_cos" in text
    assert ("comma-separated values make a grid axis" in text) == (command == "sweep")


def test_the_budget_profile_is_the_convergence_design_for_any_network_on_imagenette():
    study = resolve("auto", "budget", archs="resnet50")  # any timm model by name
    assert study.dataset == "imagenette-160" and study.archs == ["resnet50"]
    configs = study.configs()
    assert len(configs) == 192 and sum(c.epochs for c in configs) == 2040  # what docs/gpu.md and the README say
    assert "192 runs, 2040 epochs in all" in study.describe() and study.seeds_note == ""
    bn = sorted({c.epochs for c in configs if c.norm == "bn"})
    bnet = {(c.k, c.placement) for c in configs if c.norm == "bnet"}
    assert bn == [5, 10, 15, 20] and bnet == {(3, "all"), (3, "last"), (5, "last"), (1, "all")}
    assert sorted({c.epochs for c in configs if c.norm == "bnet"}) == [5, 10, 15]


def test_the_break_even_advice_times_the_studys_own_network():
    from bnet_fastai.analysis.markdown import timing_command

    row = next(pd.DataFrame([{"arch": "xmininet", "size": 28, "variant": "bnet-k3-last",  # a report row
                              "recipe": "act=relu bs=128 channels_last=True opt=adam wd=0.01"}]).itertuples())
    assert timing_command(row) == ("python benchmarks/train_step.py --archs xmininet --size 28 --bs 128 --opt adam "
                                   "--formats channels_last --variants bnet-k3-last --blocks 5")


def test_the_note_counts_only_the_comparisons_short_of_seeds():
    from bnet_fastai.analysis.answer import undecidable_note

    paired = pd.DataFrame({"n_pairs": [12, 12, 6, 12], "family_size": [4] * 4})  # 8 seeds needed for 4
    assert undecidable_note(paired).startswith("note: with 6 paired seeds 1 of the 4 comparisons here cannot reach")
    assert undecidable_note(paired.assign(n_pairs=8)) == ""


def test_a_report_of_several_datasets_names_each_lines_dataset():
    from bnet_fastai.analysis.answer import answer_lines

    row = dict(arch="xmininet", variant="bnet-k3-all", epochs=5, n_pairs=8, family_size=2, final_accuracy_diff_mean=0.01,
               final_accuracy_diff_ci_low=0.0, final_accuracy_diff_ci_high=0.02, final_accuracy_p=0.0078,
               p_holm=0.0156, verdict="BNET higher", kept_dropping_one=8, n_drops=8)
    paired = pd.DataFrame([{**row, "dataset": "fashion-mnist"}, {**row, "dataset": "imagenette-160"}])
    lines = answer_lines({"paired": paired})
    assert lines[1].startswith("  fashion-mnist xmininet bnet-k3-all at 5 epochs: +1.00 pt [+0.00, +2.00]")
    assert lines[2].startswith("  imagenette-160 xmininet bnet-k3-all at 5 epochs: ")
    assert answer_lines({"paired": paired[:1]})[1].startswith("  xmininet bnet-k3-all at 5 epochs: ")
