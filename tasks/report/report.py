"""The run's report: ranking tables, teacher and merge comparisons, validation, costs and timings (md, html, png)."""

from __future__ import annotations

import base64
import io
import re
from typing import Any

import numpy as np
import pandas as pd

from tasks.config.base import MODEL_KINDS, TEACHER
from tasks.config.schema import SearchConfig, recipe_models
from tasks.core.tables import md_table
from tasks.rating.judged import win_matrix
from tasks.rating.win_rates import NO_CLAIM, intervals_overlap
from tasks.report.tables import WIN_RATES_CAPTION, WIN_RATES_HEADING, colour_win_rates
from tasks.report.verdict import win_words


def interval_label(ratings: pd.DataFrame, confidence: float | None = None) -> str:
    """How the table's intervals were made, e.g. 'bootstrap 95%' or 'fisher 90%' (rating.ci, rating.confidence).

    The ratings carry it (ci_method, ci_level); `confidence` is only for a table from before they did.
    """
    method = str(ratings["ci_method"].iloc[0]) if "ci_method" in ratings.columns and len(ratings) else ""
    level = float(ratings["ci_level"].iloc[0]) if "ci_level" in ratings.columns and len(ratings) else confidence
    return " ".join(filter(None, [method, f"{0.95 if level is None else level:.0%}"]))


def interval_words(ratings: pd.DataFrame) -> str:
    """The intervals in words for a report's first lines, e.g. 'bootstrap 95% intervals over examples'."""
    label = interval_label(ratings)
    return f"{label} intervals" + (" over examples" if label.startswith("bootstrap") else "")


def _rating_text(rating: float) -> str:
    """A rating as a person reads it: rounded, or why there is no number."""
    if pd.isna(rating):
        return "not rated"
    return "unbeaten" if rating == float("inf") else "never won" if rating == -float("inf") else f"{rating:.0f}"


def _interval_text(lo: float, hi: float) -> str:
    """An interval as text: 'lo..hi', a one-sided bound for an unbounded rating, nothing when there is none."""
    if pd.isna(lo) or pd.isna(hi):
        return ""
    if hi == float("inf"):
        return "unbounded" if lo == -float("inf") else f">= {lo:.0f}"
    return f"<= {hi:.0f}" if lo == -float("inf") else f"{lo:.0f}..{hi:.0f}"


def _next_marks(r: pd.DataFrame) -> list[str]:
    """`>` separated from the next, `~` not, `not comparable` when the next was never compared (another group)."""
    sep = r["separated_from_next"].astype(bool).tolist()
    group = r["group"].tolist() if "group" in r.columns else [1] * len(r)
    rated = r["rating"].notna().tolist()
    marks = []
    for k in range(len(r) - 1):
        if not (rated[k] and rated[k + 1]):
            marks.append("")
        elif group[k] != group[k + 1]:
            marks.append("not comparable")
        else:
            marks.append(">" if sep[k] else "~")
    return marks + [""] if len(r) else []  # the last has no next


def ranking_rows(ratings: pd.DataFrame, scope: str = "overall", confidence: float | None = None) -> pd.DataFrame:
    """One scope's ratings, best first, with the columns a person reads.

    `vs next` is `>` where a contender is separated from the next one at the configured confidence, `~` where not,
    and `not comparable` where the next belongs to a group of contenders never compared with this one's. The interval
    column is labelled with the ratings' own method and confidence. An unbeaten contender shows its lower bound only.
    """
    r = ratings[ratings["scope"] == scope].sort_values("rank")
    finite = bool(np.isfinite(r["rating"].to_numpy(dtype=float)).all())
    rows = pd.DataFrame({
        "rank": r["rank"].astype(int), "contender": r["contender"], "kind": r["kind"],
        # Plain integers as before when every contender has a number; words where one has none.
        "rating": r["rating"].round(0).astype(int) if finite else [_rating_text(x) for x in r["rating"]],
        f"{interval_label(r, confidence)} CI": [_interval_text(lo, hi) for lo, hi in zip(r["ci_low"], r["ci_high"])],
        "win rate": r["win_rate"].map(lambda x: "" if pd.isna(x) else f"{x:.0%}"), "n": r["n_comparisons"].astype(int),
    })
    if "rating_raw" in r.columns:  # rating.length_control: the plain fit beside the controlled one
        rows.insert(5, "without length control", [_rating_text(x) for x in r["rating_raw"]])
    if "rating_arena" in r.columns and r["rating_arena"].notna().any():
        rows["Arena scale"] = [_rating_text(x) for x in r["rating_arena"]]
    if "separated_from_next" in r.columns:
        rows["vs next"] = _next_marks(r)
    if "group" in r.columns and r.loc[r["rating"].notna(), "group"].nunique() > 1:
        rows["group"] = r["group"].astype(int)
    if "note" in r.columns and (r["note"].fillna("").astype(str) != "").any():
        rows["note"] = r["note"].fillna("").astype(str)
    return rows


def scale_lines(ratings: pd.DataFrame, ties: str) -> list[str]:
    """What the Arena-scale column is, how stretched the tie model's ratings are against it, and the length term."""
    r = ratings[ratings["scope"] == "overall"]
    lines = []
    if "rating_arena" in r.columns:
        both = r[np.isfinite(r["rating"].astype(float)) & np.isfinite(r["rating_arena"].astype(float))]
        base = both["rating_raw"] if "rating_raw" in both.columns else both["rating"]
        stretch = (f"; on these judgments its ratings spread {base.std() / both['rating_arena'].std():.2f}x as wide"
                   if len(both) > 1 and both["rating_arena"].std() > 0 else "")
        model = {"davidson": "Davidson's", "rao-kupper": "Rao-Kupper's"}.get(ties)
        lines.append("`Arena scale` rates the same judgments as FastChat and Chatbot Arena do (a tie is half a win for "
                     "each side, all judgments in one pool), so it compares with Arena's Elo numbers"
                     + (f". The `rating` column counts ties with {model} tie model, which stretches the scale (about "
                        f"1.9x against half-win ties in simulations){stretch}." if model else
                        ": with rating.ties half, only the equal weighting of datasets differs."))
    if "length_coef" in r.columns and len(r):
        c, lo, hi = (float(r[k].iloc[0]) for k in ("length_coef", "length_coef_low", "length_coef_high"))
        lines.append(f"Length-controlled (rating.length_control): the judge's preference for longer outputs is part of "
                     f"the model, {c:+.0f} Elo per unit of (len_a - len_b) / (len_a + len_b) in characters (interval "
                     f"{lo:+.0f}..{hi:+.0f}): an output twice as long as the other gets {c / 3:+.0f} Elo for its length "
                     "alone. `rating` is the controlled fit, `without length control` the plain one.")
    return [x for line in lines for x in (line, "")]


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
        if not np.isfinite(gap):  # one side unbeaten (rated by a bound only), or not rated at all
            if not np.isnan(gap):
                who = ("the teacher won" if t["rating"] == np.inf else f"{best['contender']} won" if best["rating"] ==
                       np.inf else f"{best['contender']} lost" if best["rating"] == -np.inf else "the teacher lost")
                lines.append(f"- **{scope}**: best student {best['contender']} {word} the teacher: {who} every "
                             "judgment it was in, so the gap has no finite size (rated by a bound only).")
            continue
        sure = "intervals overlap, so not a clear result" if intervals_overlap(best, t) else "intervals separate"
        if round(abs(gap)) == 0:  # "trailed by 0 Elo" would name a loser where the ratings name none
            lines.append(f"- **{scope}**: best student {best['contender']} matched the teacher (0 Elo apart; {sure}).")
            continue
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
        if not np.isfinite(gap):  # an unbeaten or unrated side: no gap in Elo to state
            continue
        clear = not intervals_overlap(pooled.loc[m.name], pooled.loc[best])
        lines.append(
            f"- **{m.name}** ({m.recipe.get('merge_method', '?')} of {', '.join(parents)}): "
            f"{gap:+.0f} Elo against its best parent {best}" + (" (separated)" if clear else " (within noise)")
        )
    return lines


def winner_line(ratings: pd.DataFrame) -> str:
    """The pooled leader, named only with the caveat of whether it is separated from the runner-up."""
    r = ratings[(ratings["scope"] == "overall") & ratings["rating"].notna()].sort_values("rank")
    if len(r) < 2:
        return ""
    top, second = r.iloc[0], r.iloc[1]
    unbeaten = (f" (unbeaten: rating unbounded, at least {top['ci_low']:.0f})"
                if top.get("unbounded", "") == "above" and np.isfinite(top["ci_low"]) else "")
    if "group" in r.columns and top["group"] != second["group"]:
        return (f"**{top['contender']}** leads its group{unbeaten}, but is **not comparable** with "
                f"{second['contender']}: they were never judged against each other, directly or through common "
                "opponents. Judge across the groups before naming a winner.")
    apart = list(r.loc[r["group"] != top["group"], "contender"]) if "group" in r.columns else []
    # The leader of the main group is not ranked against the other groups: say so rather than imply it is best.
    others = (f" It is not comparable with the contenders never compared with its group: {', '.join(apart)}."
              if apart else "")
    if "separated_from_next" in r.columns and bool(top["separated_from_next"]):
        return (f"**{top['contender']}** leads{unbeaten}, separated from {second['contender']} at the configured "
                "confidence." + others)
    finite = np.isfinite(top["rating"]) and np.isfinite(second["rating"])
    # how much it leads, even when that is within noise (no number when one side is unbounded)
    by = f" by {top['rating'] - second['rating']:.0f} Elo" if finite else ""
    return (f"**{top['contender']}** leads{unbeaten}{by}, but is **not separated** from {second['contender']} at the "
            "configured confidence: treat the top of the table as a tie until more judgments separate it." + others)


def judges_text(cfg: SearchConfig) -> str:
    """'Judge: `metric`', or the judges pooled, each with its model."""
    names = [j.kind + (f" {j.model}" if j.kind != "metric" and j.model else "") for j in cfg.judge_list()]
    return ("Judge: " if len(names) == 1 else "Judges (pooled): ") + ", ".join(f"`{n}`" for n in names)


def judge_lines(stages: list[dict[str, Any]]) -> list[str]:
    """The judge's bill and behaviour: requests, dollars, position consistency, longer-output wins, why it stopped."""
    lines = []
    for row in stages:
        if not row["stage"].startswith(("judge:", "references:")) or "requests" not in row:
            continue
        parts = [f"{row['requests']} requests", f"${row.get('cost_usd', 0.0):.4f}"]
        if row.get("metric_decided"):
            parts.append(f"{row['metric_decided']} judgments decided by the metric where ground truth separated the "
                         "outputs (free), the LLM asked only where it tied")
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
    r = ratings[(ratings["scope"] == "overall") & ratings["rating"].notna()].sort_values("rank")
    if "separated_from_next" not in r.columns:
        return []
    names = list(r["contender"])
    return [f"- {a} {mark} {b}" for a, b, mark in zip(names, names[1:], _next_marks(r))]


def validation_lines(val: dict[str, Any] | None) -> list[str]:
    """The held-out check in words, one line per opponent (the report's and the exported model card's)."""
    if not val:
        return ["No validation dataset was configured."]
    when = f" (at {val['frozen_at']})" if val.get("frozen_at") else ""
    lines = [f"Winner frozen before the held-out dataset **{val.get('dataset')}** was read: **{val['winner']}**{when}.",
             ""]
    for row in val.get("against", []):
        said = win_words(row, f"**{row['opponent']}**", val.get("confidence", 0.95))
        outcome = (f"**{NO_CLAIM}**: it rated below {row['opponent']} in the search" if row["verdict"] == NO_CLAIM
                   else f"the advantage **{row['verdict']}**")
        lines.append(f"- {val['winner']} {said}: {outcome}.")
    return lines


def plot_ratings(ratings: pd.DataFrame) -> bytes:
    """PNG of every scope's fine-tuned models with their intervals, on their own scale, one panel per scope; the
    references (teacher, API models) are marked as dashed lines, or named at the edge when off that scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    scopes = list(dict.fromkeys(ratings["scope"]))
    tuned = ratings[ratings["kind"].isin(MODEL_KINDS)]
    # Two panels a row: 2 x 4.6 in at 110 dpi is ~1,010 px, about the report page's width, so a browser shows the
    # labels at their size (four panels in one row were 2,000 px, shrunk to half).
    cols = min(2, len(scopes))
    rows = -(-len(scopes) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, (0.45 * max(tuned["contender"].nunique(), 1) + 2.2) * rows),
                             sharey=False, squeeze=False)
    for ax in axes.flat[len(scopes):]:
        ax.set_visible(False)
    colors = {"candidate": "tab:blue", "merge": "tab:purple", "baseline": "tab:orange"}
    for ax, scope in zip(axes.flat, scopes):
        # Best at the top, as ranked (ratings of never-compared groups are not on one scale); unrated ones left out.
        r = ratings[(ratings["scope"] == scope) & ratings["rating"].notna()].sort_values("rank", ascending=False)
        students, refs = r[r["kind"].isin(MODEL_KINDS)], r[~r["kind"].isin(MODEL_KINDS)]
        y = np.arange(len(students))
        rating = students["rating"].to_numpy(dtype=float)
        ok = np.isfinite(rating)
        ax.errorbar(rating[ok], y[ok], xerr=[rating[ok] - students["ci_low"][ok], students["ci_high"][ok] - rating[ok]],
                    fmt="none", ecolor="lightgray", elinewidth=3)
        ax.scatter(rating[ok], y[ok], c=[colors.get(k, "black") for k in students["kind"][ok]], zorder=3)
        # Unbounded ratings: a triangle at the bound, pointing the way the rating is unbounded.
        for side, bound, marker in ((np.inf, students["ci_low"], ">"), (-np.inf, students["ci_high"], "<")):
            at = (rating == side) & np.isfinite(bound.to_numpy(dtype=float))
            ax.scatter(bound[at], y[at], marker=marker, c=[colors.get(k, "black") for k in students["kind"][at]],
                       zorder=3)
        ax.set_yticks(list(y), students["contender"])
        ends = pd.concat([students["ci_low"], students["ci_high"]]).to_numpy(dtype=float)
        ends = ends[np.isfinite(ends)]
        if len(ends):  # the students' own scale: their intervals and 8% on each side
            lo, hi = ends.min(), ends.max()
            pad = 0.08 * (hi - lo) or 10.0
            ax.set_xlim(lo - pad, hi + pad)
        _mark_references(ax, refs)
        ax.set_title(scope)
        ax.set_xlabel("rating (Elo)")
    kinds = [k for k in colors if k in set(tuned["kind"])]
    handles = [Line2D([], [], marker="o", ls="", color=colors[k], label=k) for k in kinds]
    handles += [Line2D([], [], ls="--", color="gray", label="reference (teacher, API models)"),
                Line2D([], [], lw=3, color="lightgray", label="interval")]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False)
    fig.tight_layout(rect=(0, 0.08 / rows, 1, 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _mark_references(ax: Any, refs: pd.DataFrame) -> None:
    """A dashed line per reference within the panel's scale; beyond it, the reference named at the edge."""
    lo, hi = ax.get_xlim()
    top = ax.get_ylim()[1]
    for _, ref in refs.iterrows():
        at = float(ref["rating"]) if np.isfinite(ref["rating"]) else float(ref["ci_low" if ref["rating"] > 0 else
                                                                               "ci_high"])
        shown = f"{at:.0f}" if np.isfinite(ref["rating"]) else ("unbeaten, >= " if ref["rating"] > 0 else
                                                               "never won, <= ") + f"{at:.0f}"
        if lo <= at <= hi:
            ax.axvline(at, ls="--", color="gray", lw=1)
            ax.text(at, top, f" {ref['contender']}", rotation=90, va="top", ha="right", fontsize=8, color="dimgray")
        else:
            right = at > hi
            ax.text(hi if right else lo, top, f"{ref['contender']} {shown} " + ("->" if right else "<-"),
                    ha="right" if right else "left", va="top", fontsize=8, color="dimgray")
            top -= 0.6  # the next name below, not on top of this one


def win_rate_table(judgments: pd.DataFrame, order: list[str] | None = None) -> str:
    """Markdown matrix of pooled win rates: the row contender against the column contender (ties as half), rows and
    columns in `order` (the ranking) when given."""
    m = win_matrix(judgments)
    if m.empty:
        return ""
    if order:
        names = [n for n in order if n in m.index] + [n for n in m.index if n not in order]
        m = m.loc[names, names]
    shown = m.apply(lambda col: col.map(lambda x: "" if pd.isna(x) else f"{x:.0%}"))
    return md_table(shown.reset_index())


def markdown_report(
    cfg: SearchConfig, run_id: str, ratings: pd.DataFrame, scores: pd.DataFrame, validation: dict[str, Any] | None,
    stages: list[dict[str, Any]], judgments: pd.DataFrame | None = None, formats: pd.DataFrame | None = None,
    verdict: list[str] | None = None, evidence: list[str] | None = None, judge_card: list[str] | None = None,
) -> str:
    """The whole report as Markdown, the verdict first (tasks/report/verdict.py: the recommendation, then per scope the
    best fine-tune's win rates, cost and latency); `formats` is each model's prompt format and outputs cut short."""
    how = (f"{cfg.rating.ci} {cfg.rating.confidence:.0%} intervals" + (" over examples" if cfg.rating.ci == "bootstrap"
                                                                         else ""))
    parts = [f"# basesearch report: {cfg.name}", ""]
    if verdict:
        parts += ["## Verdict", "", f"**{verdict[0][0].upper() + verdict[0][1:]}.**", "",
                  *[f"- {line}." for line in verdict[1:]], ""]
    parts += [f"Run `{run_id}`. {judges_text(cfg)}. Ratings are Bradley-Terry on the Elo scale with {how}.", "",
              "![ratings](ratings.png)", "", *stretch_notes(ratings),
              "## Ranking (pooled, each dataset weighted equally)", "",
              md_table(ranking_rows(ratings)), "", winner_line(ratings), "",
              "Neighbours in the ranking (`>` separated at the configured confidence, `~` not separated, "
              "`not comparable`: never compared, in another group):", "",
              *separation_rows(ratings), "", *scale_lines(ratings, cfg.rating.ties)]
    parts += ["## Did a student beat its teacher?", "",
              "The teacher is the dataset's own assistant answers (in the demo: a noisy teacher standing in for "
              "logged GPT-4 answers).", ""] + (teacher_lines(ratings) or ["No teacher in this run."]) + [""]
    if cfg.merges:
        parts += ["## Merges against their parents", ""] + merge_lines(cfg, ratings) + [""]
    judge = judge_lines(stages)
    if judge:
        parts += ["## Judge", ""] + judge + [""]
    parts += judge_card or []
    parts += ["## Validation on the held-out dataset", ""] + validation_lines(validation) + [""]
    if judgments is not None and len(judgments):
        parts += [f"## {WIN_RATES_HEADING} (row against column, in ranking order)", "", WIN_RATES_CAPTION, "",
                  win_rate_table(judgments, ranking_rows(ratings)["contender"].tolist()), ""]
    parts += ["## Per dataset", ""]
    for scope in [s for s in dict.fromkeys(ratings["scope"]) if s != "overall"]:
        parts += [f"### {scope}", "", md_table(ranking_rows(ratings, scope)), ""]
    if not scores.empty:
        parts += ["## Mean metric score per dataset (0..1, against the expected answer)", "",
                  md_table(scores.round(3).reset_index()), ""]
    if formats is not None and len(formats):
        parts += ["## Prompt formats", "", "Each model is trained and asked in one format (docs/model-families.md): "
                  "its own chat template, else the config's; answers end at its end-of-turn token. An answer cut "
                  f"at generate.max_new_tokens ({cfg.generate.max_new_tokens}) never reached its end of turn.", "",
                  md_table(formats), ""]
    parts += [*(evidence or []), "## Stages", "", md_table(stages_table(stages)), ""]
    return "\n".join(parts)


STRETCHED_ELO = 1500  # a scope whose fine-tunes' ratings span more than this gets a note (400 Elo = 10:1 odds)


def stretch_notes(ratings: pd.DataFrame) -> list[str]:
    """A plain note per scope whose ratings run to thousands because one contender wins (or loses) nearly every
    comparison there: the Bradley-Terry scale stretches to say so (a 2,000-Elo gap is 100,000:1 odds), so its win
    rates read better. A wide span without such a contender gets no note: nothing explains it so simply."""
    notes = []
    for scope, r in ratings.groupby("scope", sort=False):
        ends = pd.concat([r["ci_low"], r["ci_high"], r["rating"]]).to_numpy(dtype=float)
        ends = ends[np.isfinite(ends)]
        lopsided = r[(r["win_rate"] >= 0.9) | (r["win_rate"] <= 0.1)]
        if len(ends) and ends.max() - ends.min() > STRETCHED_ELO and len(lopsided):
            who = lopsided.iloc[0]
            notes.append(f"- {scope}: ratings run from {ends.min():.0f} to {ends.max():.0f} Elo because "
                         f"{who['contender']} wins {who['win_rate']:.0%} of its comparisons there; the scale "
                         "stretches to say so, and the win rates in the tables below read better than the gaps.")
    return [*notes, ""] if notes else []


def stages_table(stages: list[dict[str, Any]]) -> pd.DataFrame:
    """The stage log as a table: a figure a stage did not record is blank (not `nan`), whole numbers without `.0`."""
    def cell(v: Any) -> Any:
        """One cell as a person reads it."""
        if v is None or (isinstance(v, float) and pd.isna(v)):
            return ""
        return int(v) if isinstance(v, float) and v.is_integer() else v

    return pd.DataFrame(stages).astype(object).map(cell)


def html_report(markdown_text: str, png: bytes) -> str:
    """The Markdown report as one self-contained HTML page (the plot inlined)."""
    import markdown

    md = markdown.Markdown(extensions=["tables"])
    # The report holds no HTML of its own, but outputs and end-of-turn tokens look like tags ('</s>', '<|im_end|>'):
    # shown as text, not swallowed by the browser (Python-Markdown's documented way to leave raw HTML out).
    md.preprocessors.deregister("html_block")
    md.inlinePatterns.deregister("html")
    body = colour_win_rates(md.convert(markdown_text))
    # md_table escapes | in cells; GitHub-flavoured Markdown unescapes it inside code spans, Python-Markdown does not
    body = re.sub(r"<code>(.*?)</code>", lambda m: "<code>" + m[1].replace("\\|", "|") + "</code>", body)
    inline = f'src="data:image/png;base64,{base64.b64encode(png).decode()}"'
    # the plot inlined (the page travels alone), and a link to the full-size file beside report.html in the run
    body = re.sub(r'<img alt="([^"]*)" src="ratings.png" />',
                  lambda m: f'<a href="ratings.png" title="full size"><img alt="{m[1]}" {inline} /></a>', body)
    style = ("body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2rem .5rem}img{max-width:100%}")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>basesearch report</title>" \
           f"<style>{style}</style></head><body>{body}</body></html>"
