"""A paper's claims as comparisons between cells of a sweep, each with a verdict from the seeds.

A sweep spec may list claims::

    claims:
      - claim: "(1) MoM beats one memory of the same per-memory size"
        better: {layout: mom4_top2_shared}   # searched parameters fixing the side the claim says is better
        than: {layout: single}               # ... and the side it says is worse
        per: [model.mom.rule]                # optional: one verdict per value of these parameters

Each side is the best cell among the complete trials that match it (and the group of ``per``): searched
parameters the claim leaves free, such as a learning rate, are optimised over (the best objective, mean over
seeds), as zoology compares architectures. A side's objective per seed gives its mean and a 95 % confidence
interval (Student's t). The difference of the two sides (better minus than, in the objective's direction)
is taken seed by seed, since every trial of a sweep trains the same seeds; its 95 % interval decides:

* ``supported``: the interval lies above zero;
* ``not supported (the other side is better)``: it lies below zero;
* ``inconclusive (difference within seed spread)``: it contains zero; with one seed there is no spread to
  judge by, and the verdict says so.

Claims do not define the experiment (editing them does not change a study's fingerprint): the runner keeps
the latest spec's claims with the study, and ``momkit sweep-report`` prints the verdicts and writes
``claims.csv`` and ``claims.md``.
"""

from __future__ import annotations

import json
import math
from typing import Any

from momkit.config import ConfigError

CLAIM_KEYS = ("claim", "better", "than", "per")
# Student's t, 97.5 % quantile, by degrees of freedom (a df between two entries takes the lower: wider)
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         12: 2.179, 15: 2.131, 20: 2.086, 25: 2.060, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}


def t975(df: float) -> float:
    """The 97.5 % quantile of Student's t with ``df`` degrees of freedom (>= 1), from a table."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    return _T975[max(k for k in _T975 if k <= df)] if df < 1000 else 1.960


def parse_claims(raw: Any, space: dict, where: str = "claims") -> list[dict]:
    """Validate a spec's ``claims`` section against its searched parameters (``space``: name -> Param); the
    claims as plain mappings. Raises ConfigError naming the key, the value and what is allowed."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ConfigError(f"{where}={raw!r} is invalid: a list of claims, each a mapping with keys "
                          f"{', '.join(CLAIM_KEYS)}")
    names = list(space)
    claims = []
    for i, c in enumerate(raw):
        at = f"{where}[{i}]"
        if not isinstance(c, dict):
            raise ConfigError(f"{at}={c!r} is invalid: a mapping with keys {', '.join(CLAIM_KEYS)}")
        unknown = [k for k in c if k not in CLAIM_KEYS]
        if unknown:
            raise ConfigError(f"{at}: unknown key {unknown[0]!r} (valid keys: {', '.join(CLAIM_KEYS)})")
        text = c.get("claim")
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(f"{at}.claim={text!r} is invalid: the claim in words is required")
        sides = {}
        for side in ("better", "than"):
            s = c.get(side)
            if not isinstance(s, dict) or not s:
                raise ConfigError(f"{at}.{side}={s!r} is invalid: a non-empty mapping of searched parameters "
                                  f"({', '.join(names)}) to values")
            for name, value in s.items():
                _check_value(f"{at}.{side}.{name}", name, value, space)
            sides[side] = dict(s)
        if sides["better"] == sides["than"]:
            raise ConfigError(f"{at}: better and than are the same cell ({sides['better']}); a claim compares two")
        per = c.get("per", [])
        if isinstance(per, str):
            per = [per]
        if not isinstance(per, list) or not all(isinstance(p, str) for p in per):
            raise ConfigError(f"{at}.per={per!r} is invalid: a list of searched parameters ({', '.join(names)})")
        for p in per:
            if p not in space:
                raise ConfigError(f"{at}.per: {p!r} is not a searched parameter (searched: {', '.join(names)})")
            if p in sides["better"] or p in sides["than"]:
                raise ConfigError(f"{at}.per: {p!r} is fixed by a side already; per takes the others")
        claims.append({"claim": text.strip(), "better": sides["better"], "than": sides["than"], "per": per})
    return claims


def _check_value(key: str, name: str, value: Any, space: dict) -> None:
    if name not in space:
        raise ConfigError(f"{key}: {name!r} is not a searched parameter (searched: {', '.join(space)})")
    p = space[name]
    if p.type in ("categorical", "bundle"):
        if value not in p.values:
            raise ConfigError(f"{key}={value!r} is invalid: not among its values ({', '.join(map(repr, p.values))})")
    elif isinstance(value, bool) or not isinstance(value, (int, float)) or not p.low <= value <= p.high:
        raise ConfigError(f"{key}={value!r} is invalid: a number in its range [{p.low}, {p.high}]")


def _seed_values(row) -> list[float]:
    per = row.get("objective_per_seed")
    if isinstance(per, str) and per:
        return [float(v) for v in json.loads(per)]
    return [float(row["objective"])]


def _spread(values: list[float]) -> tuple[float, float | None]:
    """Mean and the 95 % half-width (None with one value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, t975(n - 1) * sd / math.sqrt(n)


def _difference(a: list[float], b: list[float]) -> tuple[float, float | None]:
    """Mean difference a - b and its 95 % half-width: seed by seed where both have the same seeds, else
    Welch's interval."""
    if len(a) == len(b):
        return _spread([x - y for x, y in zip(a, b)])
    (ma, _), (mb, _) = _spread(a), _spread(b)
    if min(len(a), len(b)) < 2:
        return ma - mb, None
    va = sum((v - ma) ** 2 for v in a) / (len(a) - 1) / len(a)
    vb = sum((v - mb) ** 2 for v in b) / (len(b) - 1) / len(b)
    if va + vb == 0:
        return ma - mb, 0.0
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return ma - mb, t975(df) * math.sqrt(va + vb)


def _verdict(diff: float, half: float | None) -> str:
    if half is None:
        return "inconclusive (one seed: no spread to judge by)"
    if diff - half > 0:
        return "supported"
    if diff + half < 0:
        return "not supported (the other side is better)"
    return "inconclusive (difference within seed spread)"


def _fmt(mean: float, half: float | None, n: int) -> str:
    return f"{mean:.4f}" + (f" ± {half:.4f}" if half is not None else "") + f" (n={n})"


def verdicts(df, claims: list[dict], columns: dict[str, str], direction: str) -> list[dict]:
    """One row per claim and group: both sides (the trial picked, mean ± 95 % half-width over seeds), the
    difference and the verdict. ``df``: ``trials_frame``; ``columns``: searched parameter -> its column."""
    complete = df[df["state"] == "COMPLETE"].dropna(subset=["objective"])
    sign = 1.0 if direction == "maximize" else -1.0
    rows = []
    for c in claims:
        per = c["per"]
        groups = [()]
        if per:
            present = complete[[columns[p] for p in per]].drop_duplicates().itertuples(index=False, name=None)
            groups = sorted(present, key=lambda g: tuple(map(str, g)))
        for group in groups:
            fixed = dict(zip(per, group))
            row = {"claim": c["claim"], "group": ", ".join(f"{k}={v}" for k, v in fixed.items())}
            picked = {}
            for side in ("better", "than"):
                match = complete
                for name, value in {**fixed, **c[side]}.items():
                    match = match[match[columns[name]] == value]
                if match.empty:
                    row[side] = "no complete trial"
                    continue
                best = match.loc[(sign * match["objective"]).idxmax()]
                values = _seed_values(best)
                picked[side] = values
                mean, half = _spread(values)
                row[side] = _fmt(mean, half, len(values))
                row[f"{side}_mean"], row[f"{side}_half"] = mean, half
                row[f"{side}_seeds"] = [round(float(v), 6) for v in values]
                row[f"{side}_trial"] = int(best["number"])
                if "study" in best:  # trials pooled from several studies (momkit.sweep.report.pool_trials)
                    row[f"{side}_study"] = best["study"]
                row[f"{side}_cell"] = ", ".join(f"{k}={v}" for k, v in c[side].items())
                free = [n for n in columns if n not in fixed and n not in c[side]]
                row[f"{side}_free"] = ", ".join(f"{n}={best[columns[n]]}" for n in free)
            if len(picked) < 2:
                missing = [s for s in ("better", "than") if s not in picked]
                row["verdict"] = f"no result: {' and '.join(missing)} has no complete trial"
                rows.append(row)
                continue
            a = [sign * v for v in picked["better"]]
            b = [sign * v for v in picked["than"]]
            diff, half = _difference(a, b)
            row["difference"] = f"{sign * diff:+.4f}"
            if half is not None:
                lo, hi = sorted((sign * (diff - half), sign * (diff + half)))
                row["difference"] += f" [{lo:+.4f}, {hi:+.4f}]"
            row["verdict"] = _verdict(diff, half)
            rows.append(row)
    return rows


def figure(rows: list[dict], metric: str):
    """Both sides of every judged claim (mean, 95 % interval over seeds and each seed), one row per claim and
    group, titled with the verdict; None where no claim has both sides. A fraction (every seed in [0, 1], as an
    accuracy) keeps one axis [0, 1] for all rows, its intervals cut there."""
    import matplotlib.pyplot as plt

    judged = [r for r in rows if "better_mean" in r and "than_mean" in r]
    if not judged:
        return None
    seeds = [v for r in judged for side in ("better", "than") for v in r.get(f"{side}_seeds", [])]
    fraction = bool(seeds) and all(0.0 <= v <= 1.0 for v in seeds)
    fig, axes = plt.subplots(len(judged), 1, figsize=(7.5, 0.35 + 1.05 * len(judged)), squeeze=False,
                             sharex=fraction)
    for ax, r in zip(axes[:, 0], judged):
        for y, side, colour in ((1, "better", "#1b7837"), (0, "than", "#762a83")):
            ax.errorbar(r[f"{side}_mean"], y, xerr=r[f"{side}_half"] or 0, fmt="o", color=colour, capsize=4)
            values = r.get(f"{side}_seeds", [])
            ax.plot(values, [y - 0.25] * len(values), "|", color=colour, ms=7, alpha=0.8)
        ax.set_yticks([0, 1], [f"{r['than_cell']} (trial {r['than_trial']})",
                               f"{r['better_cell']} (trial {r['better_trial']})"])
        ax.set_ylim(-0.6, 1.6)
        if fraction:
            ax.set_xlim(-0.02, 1.02)
        group = f" [{r['group']}]" if r.get("group") else ""
        ax.set_title(f"{r['claim']}{group}: {r['verdict']}", fontsize=9, loc="left")
        ax.grid(axis="x", alpha=0.3)
    cut = "; intervals cut at 0 and 1" if fraction else ""
    axes[-1, 0].set_xlabel(f"{metric} (mean and 95 % interval over seeds; ticks: each seed{cut})")
    fig.tight_layout()
    return fig


def markdown(rows: list[dict], metric: str) -> str:
    """The verdicts as a Markdown table."""
    head = ["claim", "group", "better", "than", "difference (95 % CI)", "verdict"]
    lines = [f"Objective: {metric}; each side the best cell over the parameters the claim leaves free, mean ± 95 % "
             "half-width over seeds; difference seed by seed.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    def side(r, name):
        if f"{name}_trial" not in r:
            return r[name]
        free = f"; {r[name + '_free']}" if r[name + "_free"] else ""
        study = f" of {r[name + '_study']}" if r.get(name + "_study") else ""
        return f"{r[name]} (trial {r[name + '_trial']}{study}{free})"

    for r in rows:
        cells = [r["claim"], r.get("group", ""), side(r, "better"), side(r, "than"), r.get("difference", ""),
                 r["verdict"]]
        lines.append("| " + " | ".join(str(x).replace("|", "/") for x in cells) + " |")
    return "\n".join(lines) + "\n"
