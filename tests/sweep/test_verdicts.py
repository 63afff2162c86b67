"""A paper's claims judged from a sweep's seeds (``momkit.sweep.verdicts``): the statistics on made-up trials,
the spec's validation, and the verdicts printed and written by ``momkit sweep-report`` after a real sweep."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from momkit.cli import main
from momkit.config import ConfigError
from momkit.sweep.spec import load_spec
from momkit.sweep.verdicts import t975, verdicts

COLUMNS = {"layout": "layout", "optim.lr": "optim.lr", "model.mom.rule": "model.mom.rule"}


def _frame(cells: list[tuple]) -> pd.DataFrame:
    """Trials (layout, lr, rule, per-seed objectives), complete unless the objectives are None."""
    rows = []
    for n, (layout, lr, rule, seeds) in enumerate(cells):
        rows.append({"number": n, "state": "COMPLETE" if seeds else "FAIL", "layout": layout, "optim.lr": lr,
                     "model.mom.rule": rule, "objective": sum(seeds) / len(seeds) if seeds else None,
                     "objective_per_seed": json.dumps(seeds) if seeds else None})
    return pd.DataFrame(rows)


CLAIM = {"claim": "mom beats single", "better": {"layout": "mom"}, "than": {"layout": "single"}, "per": []}


def test_student_t_quantiles():
    assert t975(1) == 12.706 and t975(2) == 4.303 and t975(11) == 2.228 and t975(5000) == 1.96
    with pytest.raises(ValueError):
        t975(0)


def test_each_side_takes_its_best_learning_rate_and_the_difference_is_seed_by_seed():
    df = _frame([("mom", 1e-3, "g", [0.50, 0.52, 0.54]), ("mom", 3e-3, "g", [0.90, 0.91, 0.95]),
                 ("single", 1e-3, "g", [0.60, 0.61, 0.62]), ("single", 3e-3, "g", [0.40, 0.40, 0.41])])
    [row] = verdicts(df, [CLAIM], COLUMNS, "maximize")
    assert row["better_trial"] == 1 and row["than_trial"] == 2  # the best learning rate of each side
    assert row["better_free"] == "optim.lr=0.003, model.mom.rule=g"
    # differences per seed 0.30, 0.30, 0.33: mean 0.31, sd 0.01732, half-width 4.303 * 0.01732 / sqrt(3)
    assert row["difference"] == "+0.3100 [+0.2670, +0.3530]"
    assert row["verdict"] == "supported"
    assert row["better"] == "0.9200 ± 0.0657 (n=3)"


def test_not_supported_inconclusive_one_seed_and_a_missing_side():
    worse = _frame([("mom", 1e-3, "g", [0.40, 0.41, 0.42]), ("single", 1e-3, "g", [0.60, 0.61, 0.63])])
    assert verdicts(worse, [CLAIM], COLUMNS, "maximize")[0]["verdict"] == "not supported (the other side is better)"
    close = _frame([("mom", 1e-3, "g", [0.60, 0.50, 0.70]), ("single", 1e-3, "g", [0.55, 0.65, 0.58])])
    assert verdicts(close, [CLAIM], COLUMNS, "maximize")[0]["verdict"] == \
        "inconclusive (difference within seed spread)"
    one = _frame([("mom", 1e-3, "g", [0.9]), ("single", 1e-3, "g", [0.1])])
    assert verdicts(one, [CLAIM], COLUMNS, "maximize")[0]["verdict"].startswith("inconclusive (one seed")
    failed = _frame([("mom", 1e-3, "g", None), ("single", 1e-3, "g", [0.1, 0.2])])
    row = verdicts(failed, [CLAIM], COLUMNS, "maximize")[0]
    assert row["verdict"] == "no result: better has no complete trial" and "difference" not in row


def test_minimised_objectives_and_one_verdict_per_group():
    df = _frame([("mom", 1e-3, "a", [1.0, 1.1, 1.2]), ("single", 1e-3, "a", [2.0, 2.1, 2.3]),
                 ("mom", 1e-3, "b", [3.0, 3.1, 3.2]), ("single", 1e-3, "b", [2.0, 2.1, 2.2])])
    claim = {**CLAIM, "per": ["model.mom.rule"]}
    rows = verdicts(df, [claim], COLUMNS, "minimize")  # a loss: lower is better
    assert [r["group"] for r in rows] == ["model.mom.rule=a", "model.mom.rule=b"]
    assert rows[0]["verdict"] == "supported" and rows[0]["difference"].startswith("-1.0")
    assert rows[1]["verdict"] == "not supported (the other side is better)"


def _spec(tmp_path, make_spec, claims):
    return make_spec(tmp_path / "c.yaml", space={"model.mom.num_memories": [1, 2], "optim.lr": [1e-3, 3e-3]},
                     claims=claims)


@pytest.mark.parametrize(("claims", "message"), [
    ({"claim": "x"}, "claims={'claim': 'x'} is invalid: a list of claims"),
    ([{"claim": "x", "better": {"model.mom.topk": 2}, "than": {"model.mom.num_memories": 1}}],
     "claims[0].better.model.mom.topk: 'model.mom.topk' is not a searched parameter"),
    ([{"claim": "x", "better": {"model.mom.num_memories": 3}, "than": {"model.mom.num_memories": 1}}],
     "claims[0].better.model.mom.num_memories=3 is invalid: not among its values (1, 2)"),
    ([{"claim": "x", "better": {"model.mom.num_memories": 1}, "than": {"model.mom.num_memories": 1}}],
     "claims[0]: better and than are the same cell"),
    ([{"claim": "x", "better": {"model.mom.num_memories": 2}, "than": {"model.mom.num_memories": 1},
       "per": ["model.mom.num_memories"]}], "claims[0].per: 'model.mom.num_memories' is fixed by a side"),
    ([{"claim": "", "better": {"model.mom.num_memories": 2}, "than": {"model.mom.num_memories": 1}}],
     "claims[0].claim='' is invalid"),
    ([{"claim": "x", "better": {"model.mom.num_memories": 2}, "than": {}}], "claims[0].than={} is invalid"),
    ([{"claim": "x", "better": {"model.mom.num_memories": 2}, "than": {"model.mom.num_memories": 1},
       "why": "?"}], "claims[0]: unknown key 'why'"),
])
def test_bad_claims_name_the_key(tmp_path, make_spec, claims, message):
    with pytest.raises(ConfigError) as exc:
        load_spec(_spec(tmp_path, make_spec, claims))
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_sweep_report_judges_the_claims_and_picks_up_edited_ones(tmp_path, make_spec, capsys):
    claim = {"claim": "two memories beat one", "better": {"model.mom.num_memories": 2},
             "than": {"model.mom.num_memories": 1}}
    spec = make_spec(tmp_path / "c.yaml", seeds=2, claims=[claim])
    url = f"sqlite:///{tmp_path / 'sweeps.db'}"
    assert main(["sweep", str(spec), "--storage", url]) == 0
    assert main(["sweep-report", "c", "--storage", url, "--out", str(tmp_path / "report")]) == 0
    out = capsys.readouterr().out
    assert "claims (valid/accuracy;" in out and "two memories beat one:" in out
    table = pd.read_csv(tmp_path / "report" / "claims.csv")
    assert table["claim"].tolist() == ["two memories beat one"] and "(n=2)" in table["better"][0]
    assert table["verdict"][0].split(" (")[0] in ("supported", "not supported", "inconclusive")
    assert "| two memories beat one |" in (tmp_path / "report" / "claims.md").read_text()
    assert (tmp_path / "report" / "claims.png").stat().st_size > 5000

    # claims are not part of the experiment: edited, the study resumes and the report judges the new ones
    make_spec(tmp_path / "c.yaml", seeds=2, claims=[{**claim, "claim": "one memory is worse"}])
    assert main(["sweep", str(spec), "--storage", url]) == 0
    assert main(["sweep-report", "c", "--storage", url, "--out", str(tmp_path / "report")]) == 0
    assert "one memory is worse:" in capsys.readouterr().out


def test_claims_figure_keeps_a_fraction_on_one_axis_from_0_to_1():
    from momkit.sweep.verdicts import figure

    def row(values_better, values_than):
        r = {"claim": "c", "better_cell": "a", "than_cell": "b", "better_trial": 1, "than_trial": 2, "verdict": "v"}
        for side, vals in (("better", values_better), ("than", values_than)):
            r[f"{side}_mean"], r[f"{side}_half"], r[f"{side}_seeds"] = sum(vals) / len(vals), 0.5, vals
        return r

    fig = figure([row([0.9, 0.95, 1.0], [0.1, 0.5, 0.9]), row([0.2, 0.3, 0.4], [0.0, 0.1, 0.2])], "accuracy")
    assert all(ax.get_xlim() == (-0.02, 1.02) for ax in fig.axes)
    assert "intervals cut at 0 and 1" in fig.axes[-1].get_xlabel()
    assert len([ln for ln in fig.axes[0].get_lines() if len(ln.get_xdata()) == 3]) == 2  # each side's seeds
    loss = figure([row([2.0, 2.5, 3.0], [3.0, 3.5, 4.0])], "loss")
    assert loss.axes[0].get_xlim()[1] > 3.0 and "cut" not in loss.axes[0].get_xlabel()


def test_claims_pooled_with_studies_that_widen_the_grid(tmp_path, make_spec, capsys):
    """``sweep-report --pool``: each side's best cell is taken over the study's trials and those of the same
    experiment on another learning rate (the rows name the study they come from); a study of another experiment
    (other overrides, other searched parameters) or the study itself is refused, naming what differs."""
    claim = {"claim": "two memories beat one", "better": {"model.mom.num_memories": 2},
             "than": {"model.mom.num_memories": 1}}
    url = f"sqlite:///{tmp_path / 'sweeps.db'}"
    space = {"model.mom.num_memories": [1, 2]}
    for name, lr in (("a", 1e-3), ("b", 3e-2)):
        spec = make_spec(tmp_path / f"{name}.yaml", seeds=2, claims=[claim], space={**space, "optim.lr": [lr]})
        assert main(["sweep", str(spec), "--storage", url]) == 0
    from momkit.sweep.report import load_study, trials_frame

    frames = {n: trials_frame(load_study(n, url)) for n in ("a", "b")}
    assert main(["sweep-report", "a", "--storage", url, "--out", str(tmp_path / "report"), "--pool", "b"]) == 0
    assert "with the trials of b" in capsys.readouterr().out
    row = pd.read_csv(tmp_path / "report" / "claims.csv").iloc[0]
    for side, memories in (("better", 2), ("than", 1)):
        cells = [(f[f["model.mom.num_memories"] == memories]["objective"].max(), n) for n, f in frames.items()]
        best, study = max(cells)
        assert row[f"{side}_study"] == study and row[f"{side}_mean"] == pytest.approx(best)
    assert f"of {row['better_study']}" in (tmp_path / "report" / "claims.md").read_text()
    # alone, the study judges its own trials only
    assert main(["sweep-report", "a", "--storage", url, "--out", str(tmp_path / "alone")]) == 0
    assert "better_study" not in pd.read_csv(tmp_path / "alone" / "claims.csv")

    other = make_spec(tmp_path / "c.yaml", seeds=2, claims=[claim], space={**space, "optim.lr": [1e-2]},
                      overrides={"optim.max_steps": 3})
    assert main(["sweep", str(other), "--storage", url]) == 0
    narrow = make_spec(tmp_path / "d.yaml", seeds=2, claims=[claim], space=space)
    assert main(["sweep", str(narrow), "--storage", url]) == 0
    capsys.readouterr()
    for pooled, message in (("c", "--pool 'c' is invalid: its overrides"), ("a", "it is the study reported"),
                            ("d", "--pool 'd' is invalid: it searches model.mom.num_memories, 'a' searches")):
        assert main(["sweep-report", "a", "--storage", url, "--out", str(tmp_path / "x"), "--pool", pooled]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
