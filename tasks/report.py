"""The run's report: ranking tables, teacher and merge comparisons, validation, costs and timings (md, html, png)."""

from __future__ import annotations

import base64
import io
from typing import Any

import pandas as pd

from tasks.config import MODEL_KINDS, TEACHER, SearchConfig, recipe_models
from tasks.rate import win_matrix


def ranking_rows(ratings: pd.DataFrame, scope: str = "overall", confidence: float = 0.95) -> pd.DataFrame:
    """One scope's ratings, best first, with the columns a person reads.

    `vs next` is `>` where a contender is separated from the next one at the configured confidence, `~` where not.
    """
    r = ratings[ratings["scope"] == scope].sort_values("rank")
    rows = pd.DataFrame({
        "rank": r["rank"].astype(int), "contender": r["contender"], "kind": r["kind"],
        "rating": r["rating"].round(0).astype(int),
        f"{confidence:.0%} CI": [f"{lo:.0f}..{hi:.0f}" for lo, hi in zip(r["ci_low"], r["ci_high"])],
        "win rate": r["win_rate"].map(lambda x: f"{x:.0%}"), "n": r["n_comparisons"].astype(int),
    })
    if "separated_from_next" in r.columns:
        marks = [">" if sep else "~" for sep in r["separated_from_next"]]
        rows["vs next"] = marks[:-1] + [""]  # the last has no next
    return rows


def text_table(df: pd.DataFrame) -> str:
    """A DataFrame as a plain aligned text table for the terminal."""
    return df.to_string(index=False)


def md_table(df: pd.DataFrame) -> str:
    """A DataFrame as a Markdown table."""
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def _overlap(a: pd.Series, b: pd.Series) -> bool:
    """True when two contenders' rating intervals overlap."""
    return not (a["ci_low"] > b["ci_high"] or b["ci_low"] > a["ci_high"])


def teacher_lines(ratings: pd.DataFrame) -> list[str]:
    """Per scope: did the best fine-tune beat the teacher whose answers it was trained on?"""
    lines = []
    for scope, r in ratings.groupby("scope", sort=False):
        models = r[r["kind"].isin(MODEL_KINDS)].sort_values("rating", ascending=False)
        teacher = r[r["contender"] == TEACHER]
        if models.empty or teacher.empty:
            continue
        best, t = models.iloc[0], teacher.iloc[0]
        gap = best["rating"] - t["rating"]
        word = "beat" if gap > 0 else "trailed"
        sure = "intervals overlap, so not a clear result" if _overlap(best, t) else "intervals separate"
        lines.append(f"- **{scope}**: best student {best['contender']} {word} the teacher by {abs(gap):.0f} Elo ({sure}).")
    return lines


def merge_lines(cfg: SearchConfig, ratings: pd.DataFrame) -> list[str]:
    """Per merge: its pooled rating against its parents'."""
    pooled = ratings[ratings["scope"] == "overall"].set_index("contender")
    lines = []
    for m in cfg.merges:
        parents = [p for p in recipe_models(m.recipe) if p in pooled.index]
        if m.name not in pooled.index or not parents:
            continue
        best = max(parents, key=lambda p: pooled.at[p, "rating"])
        gap = pooled.at[m.name, "rating"] - pooled.at[best, "rating"]
        clear = not _overlap(pooled.loc[m.name], pooled.loc[best])
        lines.append(
            f"- **{m.name}** ({m.recipe.get('merge_method', '?')} of {', '.join(parents)}): "
            f"{gap:+.0f} Elo against its best parent {best}" + (" (separated)" if clear else " (within noise)")
        )
    return lines


def winner_line(ratings: pd.DataFrame) -> str:
    """The pooled leader, named only with the caveat of whether it is separated from the runner-up."""
    r = ratings[ratings["scope"] == "overall"].sort_values("rank")
    if len(r) < 2:
        return ""
    top, second = r.iloc[0], r.iloc[1]
    if "separated_from_next" in r.columns and bool(top["separated_from_next"]):
        return f"**{top['contender']}** leads, separated from {second['contender']} at the configured confidence."
    return (f"**{top['contender']}** leads, but is **not separated** from {second['contender']} at the configured "
            "confidence: treat the top of the table as a tie until more judgments separate it.")


def judge_lines(stages: list[dict[str, Any]]) -> list[str]:
    """The judge's bill and behaviour: requests, dollars, position consistency, longer-output wins, why it stopped."""
    lines = []
    for row in stages:
        if not row["stage"].startswith(("judge:", "references:")) or "requests" not in row:
            continue
        parts = [f"{row['requests']} requests", f"${row.get('cost_usd', 0.0):.4f}"]
        if row.get("consistency") is not None:
            parts.append(f"position consistency {row['consistency']:.0%} (both orders agree)")
        if row.get("longer_won") is not None:
            parts.append(f"longer output won {row['longer_won']:.0%} of decided judgments")
        if row.get("stop"):
            parts.append(f"stopped: {row['stop']}")
        lines.append(f"- **{row['stage']}**: " + "; ".join(parts) + ".")
    return lines


def separation_rows(ratings: pd.DataFrame) -> list[str]:
    """Which neighbours in the pooled ranking are separated at the configured confidence."""
    r = ratings[ratings["scope"] == "overall"].sort_values("rank")
    if "separated_from_next" not in r.columns:
        return []
    names = list(r["contender"])
    return [f"- {a} {'>' if sep else '~'} {b}" for a, b, sep in zip(names, names[1:], r["separated_from_next"])]


def validation_lines(val: dict[str, Any] | None) -> list[str]:
    """The held-out check in words."""
    if not val:
        return ["No validation dataset was configured."]
    lines = [f"Winner frozen before the held-out data was read: **{val['winner']}** (at {val['frozen_at']}).",
             f"Held-out dataset: **{val['dataset']}**.", ""]
    for row in val["against"]:
        lines.append(
            f"- against **{row['opponent']}**: win rate {row['win_rate']:.0%} "
            f"(95% CI {row['ci_low']:.0%}..{row['ci_high']:.0%}, {row['n_examples']} examples): "
            f"the advantage **{row['verdict']}**."
        )
    return lines


def plot_ratings(ratings: pd.DataFrame) -> bytes:
    """PNG of every scope's ratings with their intervals, one panel per scope."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scopes = list(dict.fromkeys(ratings["scope"]))
    fig, axes = plt.subplots(1, len(scopes), figsize=(4.2 * len(scopes), 0.45 * ratings["contender"].nunique() + 1.6),
                             sharey=False, squeeze=False)
    colors = {"candidate": "tab:blue", "merge": "tab:purple", "reference": "tab:gray", "baseline": "tab:orange"}
    for ax, scope in zip(axes[0], scopes):
        r = ratings[ratings["scope"] == scope].sort_values("rating")
        y = range(len(r))
        ax.errorbar(r["rating"], y, xerr=[r["rating"] - r["ci_low"], r["ci_high"] - r["rating"]], fmt="none",
                    ecolor="lightgray", elinewidth=3)
        ax.scatter(r["rating"], y, c=[colors.get(k, "black") for k in r["kind"]], zorder=3)
        ax.set_yticks(list(y), r["contender"])
        ax.set_title(scope)
        ax.set_xlabel("rating (Elo)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def win_rate_table(judgments: pd.DataFrame) -> str:
    """Markdown matrix of pooled win rates: the row contender against the column contender (ties as half)."""
    m = win_matrix(judgments)
    if m.empty:
        return ""
    shown = m.apply(lambda col: col.map(lambda x: "" if pd.isna(x) else f"{x:.0%}"))
    return md_table(shown.reset_index())


def markdown_report(
    cfg: SearchConfig, run_id: str, ratings: pd.DataFrame, scores: pd.DataFrame, validation: dict[str, Any] | None,
    stages: list[dict[str, Any]], judgments: pd.DataFrame | None = None, formats: pd.DataFrame | None = None,
) -> str:
    """The whole report as Markdown; `formats` is each fine-tuned model's prompt format and outputs cut short."""
    parts = [f"# basesearch report: {cfg.name}", "", f"Run `{run_id}`. Judge: `{cfg.judge.kind}`. "
             "Ratings are Bradley-Terry on the Elo scale with bootstrap 95% intervals over examples.", "",
             "![ratings](ratings.png)", "", "## Ranking (pooled, each dataset weighted equally)", "",
             md_table(ranking_rows(ratings)), "", winner_line(ratings), "",
             "Neighbours in the ranking (`>` separated at the configured confidence, `~` not separated):", "",
             *separation_rows(ratings), ""]
    parts += ["## Did a student beat its teacher?", "",
              "The teacher is the dataset's own assistant answers (in the demo: a noisy teacher standing in for "
              "logged GPT-4 answers).", ""] + (teacher_lines(ratings) or ["No teacher in this run."]) + [""]
    if cfg.merges:
        parts += ["## Merges against their parents", ""] + merge_lines(cfg, ratings) + [""]
    judge = judge_lines(stages)
    if judge:
        parts += ["## Judge", ""] + judge + [""]
    parts += ["## Validation on the held-out dataset", ""] + validation_lines(validation) + [""]
    if judgments is not None and len(judgments):
        parts += ["## Win rates, all datasets pooled (row against column)", "", win_rate_table(judgments), ""]
    parts += ["## Per dataset", ""]
    for scope in [s for s in dict.fromkeys(ratings["scope"]) if s != "overall"]:
        parts += [f"### {scope}", "", md_table(ranking_rows(ratings, scope)), ""]
    if not scores.empty:
        parts += ["## Mean metric score per dataset (0..1, against the expected answer)", "",
                  md_table(scores.round(3).reset_index()), ""]
    if formats is not None and len(formats):
        parts += ["## Prompt formats", "", "Each model is trained and asked in one format (README: *Model families*): "
                  "its own chat template, else the config's; answers end at its end-of-turn token. An answer cut "
                  f"at generate.max_new_tokens ({cfg.generate.max_new_tokens}) never reached its end of turn.", "",
                  md_table(formats), ""]
    parts += ["## Stages", "", md_table(pd.DataFrame(stages)), ""]
    return "\n".join(parts)


def html_report(markdown_text: str, png: bytes) -> str:
    """The Markdown report as one self-contained HTML page (the plot inlined)."""
    import markdown

    body = markdown.markdown(markdown_text, extensions=["tables"])
    body = body.replace('src="ratings.png"', f'src="data:image/png;base64,{base64.b64encode(png).decode()}"')
    style = ("body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2rem .5rem}img{max-width:100%}")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>basesearch report</title>" \
           f"<style>{style}</style></head><body>{body}</body></html>"
