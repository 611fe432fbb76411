"""The report's evidence tables: how each fine-tune trained, and example outputs side by side."""

from __future__ import annotations

import json
import re

import pandas as pd

from tasks.config.base import TEACHER
from tasks.data.load import Example

EXAMPLE_ROWS = 3  # test rows shown side by side per dataset
CELL_CHARS = 160  # longer texts are cut (with an ellipsis) so a table row stays readable


def finetune_table(metrics: dict[tuple[str, str], dict]) -> pd.DataFrame:
    """One row per fine-tune (model, dataset): the settings it trained with (and what its search tried), training
    time, tokens/s, peak memory and the loss it reached."""
    rows = []
    for (model, dataset), m in metrics.items():
        peak = m.get("peak_rss_mb") or m.get("peak_cuda_mb")
        rows.append({"model": model, "dataset": dataset, **settings_cells(m), "device": m.get("device", "?"),
                     "steps": m.get("steps"), "seconds": m.get("plan_seconds", m.get("seconds")),
                     "tokens/s": round(m.get("tokens_per_s") or 0), "peak memory MB": round(peak) if peak else "",
                     "loss first": m.get("loss_first"), "loss last": m.get("loss_last")})
    return pd.DataFrame(rows)


def settings_cells(m: dict) -> dict[str, object]:
    """A fine-tune's learning rate and epochs, and with finetune.search the rates it tried (a diverged one marked)
    and its development loss from the first check to the lowest."""
    s = m.get("search")
    cells: dict[str, object] = {"learning rate": f"{m['learning_rate']:.2g}" if "learning_rate" in m else "",
                                "epochs": m.get("epochs", "")}
    if s:
        cells["rates tried"] = ", ".join(f"{lr:.2g}" + (" (diverged)" if lr in s.get("diverged", []) else "")
                                         for lr in s["learning_rates"])
        cells["dev loss"] = f"{s['first_dev_loss']} -> {s['best_dev_loss']} ({s['dev_rows']} rows)"
    return cells


def _cell(text: object) -> str:
    """A text as one Markdown table cell: one line, pipes escaped, cut at CELL_CHARS."""
    raw = text if isinstance(text, str) else json.dumps(text, ensure_ascii=False)  # an `expected` object as JSON
    s = " ".join(raw.split()).replace("|", "\\|")
    return s if len(s) <= CELL_CHARS else s[: CELL_CHARS - 1] + "…"


def examples_table(examples: list[Example], outputs: dict[str, pd.DataFrame], contenders: list[str]) -> pd.DataFrame:
    """The first test rows of a dataset: the prompt's last message, the expected answer, the teacher's and each
    contender's output (contenders in the order given, e.g. best first)."""
    rows = []
    by_id = {c: dict(zip(df["example_id"].astype(str), df["output"])) for c, df in outputs.items()}
    for e in examples[:EXAMPLE_ROWS]:
        row = {"example": e.id, "prompt": _cell(e.prompt[-1]["content"]),
               "expected": _cell(e.expected) if e.expected is not None else "", TEACHER: _cell(e.answer)}
        row |= {c: _cell(by_id.get(c, {}).get(str(e.id), "")) for c in contenders if c != TEACHER}
        rows.append(row)
    return pd.DataFrame(rows)


def top_contenders(ratings: pd.DataFrame, scope: str, n: int = 3) -> list[str]:
    """The best `n` fine-tuned models of a scope, then its API references (the teacher has its own column)."""
    from tasks.config.base import MODEL_KINDS
    from tasks.rating.win_rates import pooled_models

    tuned = pooled_models(ratings, scope)["contender"].tolist()[:n]
    r = ratings[(ratings["scope"] == scope) & ~ratings["kind"].isin(MODEL_KINDS)]
    return tuned + r[r["contender"] != TEACHER].sort_values("rating", ascending=False)["contender"].tolist()


def evidence_lines(finetunes: pd.DataFrame, examples: dict[str, pd.DataFrame]) -> list[str]:
    """The report's sections after the ratings: each fine-tune's training figures, then example outputs."""
    from tasks.core.tables import md_table

    lines = []
    if len(finetunes):
        lines += ["## Fine-tunes", "", "The settings, training time (its settings search included), throughput, "
                  "peak memory and loss of every LoRA fine-tune (from its adapter's train_metrics.json). With "
                  "`finetune.search`, each (model, dataset) tried the rates shown on its development rows (training "
                  "on the rest), the best went on, and the fine-tune trained on all its rows at that rate for the "
                  "epochs where the development loss was lowest.", "", md_table(finetunes.fillna("")), ""]
    if examples:
        lines += ["## Example outputs", "", f"The first {EXAMPLE_ROWS} test rows of each dataset: the prompt's last "
                  "message, the expected answer, the teacher's, and the best fine-tunes' (best first) and the "
                  "references'.", ""]
        for ds, table in examples.items():
            lines += [f"### {ds}", "", md_table(table), ""]
    return lines


WIN_RATES_HEADING = "Win rates, all datasets pooled"  # the section whose table colour_win_rates colours
# Light ends of ColorBrewer's RdBu scale (colour-blind safe), as RGB: red where the row loses, blue where it wins.
LOSES, EVEN, WINS = (244, 165, 130), (247, 247, 247), (146, 197, 222)
WIN_RATES_CAPTION = ("Each cell is the share of judgments the row's contender won against the column's, ties "
                     "counted half; report.html colours it from red (0%: the row always lost) through white (50%) to "
                     "blue (100%: the row always won).")


def win_colour(rate: float) -> str:
    """CSS background of a win rate in [0, 1]: LOSES at 0, EVEN at 0.5, WINS at 1, linear in between."""
    end, t = (LOSES, 1 - 2 * rate) if rate < 0.5 else (WINS, 2 * rate - 1)
    r, g, b = (round(e + (x - e) * t) for e, x in zip(EVEN, end))
    return f"#{r:02x}{g:02x}{b:02x}"


def colour_win_rates(html: str) -> str:
    """The HTML report with each cell of the win-rate matrix coloured by its rate, and a legend under the table."""
    at = html.find(WIN_RATES_HEADING)
    start = html.find("<table>", at) if at >= 0 else -1
    if start < 0:
        return html
    end = html.find("</table>", start) + len("</table>")
    table = re.sub(r"<td>(\d+)%</td>",
                   lambda m: f'<td style="background:{win_colour(int(m[1]) / 100)}">{m[1]}%</td>', html[start:end])
    legend = "<p>" + " ".join(f'<span style="background:{win_colour(r)};padding:0 .6rem">{r:.0%}</span>'
                              for r in (0, 0.25, 0.5, 0.75, 1)) + " win rate of the row against the column</p>"
    return html[:start] + table + legend + html[end:]
