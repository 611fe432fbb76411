"""What the LLM judges cost before they run: how many comparisons each makes, and their dollars.

`budget.strategy: all-pairs` judges every pair of contenders on every test row (twice with both orders): that count
is the bound. `adaptive` (tasks/judge/rounds.py) stops once the leader is separated, usually after a small share of
the bound, so it is priced by an estimate of where it stops (adaptive_estimate), with the bound printed beside it.
The estimate is not a cap: judging itself stops at budget.max_usd and budget.max_comparisons whatever it said.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import TYPE_CHECKING, Any

from tasks.compute.speeds import conversation_chars
from tasks.judge.rounds import look_grid, look_level

if TYPE_CHECKING:
    from tasks.config.schema import BudgetConfig, JudgeConfig, ModelPrice, SearchConfig

CHARS_PER_TOKEN = 4  # the usual English ratio for BPE vocabularies; only the dollar estimates use it
JUDGE_PROMPT_TOKENS = 250  # the judge's instructions and verdict format, beside the conversation and answers
VERDICT_TOKENS = 30  # a verdict: ~30 tokens of JSON
ELO_PER_LOGIT = 400 / math.log(10)  # 173.7 Elo per unit of Bradley-Terry log-strength
# The adaptive estimate assumes the leader this far ahead of the runner-up: it wins 1 / (1 + 10^(-100/400)) = 64% of
# their comparisons. A closer race judges more (up to the caps), a clearer one less.
ASSUMED_GAP_ELO = 100.0
# Judgments after the warm-up per judgment of the leader against the runner-up that separates them (see
# adaptive_estimate): each round also judges the leader against the other challengers not yet separated, and a stop
# waits for the next look (up to 25% later). Calibrated by simulating tasks/judge/rounds.py (a leader 100 Elo ahead,
# the others 30 Elo apart below the runner-up, both orders of a comparison giving the same verdict, 3 x 1,000
# examples, 6 seeds each): it stopped after warm-up + 512, 942, 902 and 856 judgments at the median for 4, 8, 13 and
# 20 contenders; with 240 direct judgments at 13 contenders, 902 / 240 = 3.8, and 3.5 with the rounding up to a look
# gives 876, 1,296, 1,526 and 2,376 judgments where the simulations stopped at 560 (448-876), 1,166 (662-1,296),
# 1,526 (1,220-1,908) and 2,376 (2,376-2,970); with one order, 760 for 13 contenders (simulated: 760, 608-950).
SHARED = 3.5


def request_usd(price: ModelPrice | None, prompt_chars: float, answer_tokens: float) -> float:
    """Dollars of requests: prompt tokens (characters / 4) and answer tokens at the model's price."""
    if price is None:
        return 0.0
    return (prompt_chars / CHARS_PER_TOKEN * price.input + answer_tokens * price.output) / 1e6


def judgment_usd(cfg: SearchConfig, judge: JudgeConfig, rows: list[Any]) -> float:
    """Dollars of one judgment on these rows: instructions, conversation, two answers and the reference, a verdict."""
    chars = sum(conversation_chars(r.prompt, r.answer) for r in rows) / max(len(rows), 1)
    prompt = JUDGE_PROMPT_TOKENS * CHARS_PER_TOKEN + 3 * chars  # conversation, two answers, reference
    return request_usd(cfg.prices.get(judge.model or ""), prompt, VERDICT_TOKENS)


@dataclass(frozen=True)
class AdaptiveEstimate:
    """Where the adaptive planner is estimated to stop, in judgments (rows) over all datasets, and its terms."""

    judgments: int
    warmup: int  # the first look: every pair's warm-up
    direct: float  # judgments of the leader against the runner-up that separate them at the looks' level
    looks: int


def adaptive_estimate(budget: BudgetConfig, contenders: int, examples: int, orders: int) -> AdaptiveEstimate:
    """Judgments the adaptive planner makes before it stops, for a leader ASSUMED_GAP_ELO ahead of the runner-up.

    One verdict between two contenders near 50% carries Fisher information p(1 - p) = 1/4 about their gap in
    logits, so n comparisons measure it to 2 / sqrt(n) logits = 347 / sqrt(n) Elo; the gap is separated when it is
    z of those, z the normal quantile of the level each look is tested at (rounds.py look_level), so n =
    (z x 347 / gap)^2 comparisons, x orders judgments (both orders of one example mostly agree, and the planner's
    test clusters them by example: a comparison counts as one verdict). E.g.
    13 contenders, 3,000 examples, both orders: 31 looks at 0.05 / 31, z = 3.16, n = (3.16 x 347 / 100)^2 = 120,
    240 judgments. The estimate is the first look at or after warm-up + SHARED x those, within the bound.
    """
    pairs = math.comb(contenders, 2)
    grid = look_grid(pairs, examples, budget, orders)
    bound = pairs * examples * orders
    if budget.max_comparisons is not None:
        bound = min(bound, budget.max_comparisons // orders * orders)
    if len(grid) == 0:  # the warm-up alone reaches the bound: every comparison is judged
        return AdaptiveEstimate(bound, bound, 0.0, 1)
    z = NormalDist().inv_cdf(1 - (1 - look_level(budget.confidence, len(grid) + 1)) / 2)
    direct = orders * (z * 2 * ELO_PER_LOGIT / ASSUMED_GAP_ELO) ** 2
    later = grid[grid >= grid[0] + SHARED * direct]
    return AdaptiveEstimate(int(later[0]) if len(later) else bound, int(grid[0]), direct, len(grid) + 1)


@dataclass(frozen=True)
class JudgeCost:
    """One LLM judge on one dataset: the comparisons (judgments) it is estimated to make, the bound, their dollars."""

    name: str  # e.g. 'LLM judge on extraction'
    count: float  # comparisons: adaptive's estimate, else `most`
    most: float  # the most it may make: every pair on every row in every order shown, or budget.max_comparisons's share
    capped: bool  # `most` is budget.max_comparisons's share, under every pair
    usd: float  # of `count`
    usd_max: float  # of `most`
    estimated: bool  # adaptive, under `most`: `count` is an estimate of where the planner stops
    pairs: str = "all pairs"  # which pairs `most` counts (validation: the winner's)
    dataset: str = ""
    model: str = ""  # the judge model
    repeats: float = 0.0  # judgments the judge card asks a second time (judge.repeat_share), in `usd` and `usd_max`

    def job_name(self) -> str:
        """The plan job's name: who judges what, and how many comparisons."""
        return f"{self.name}: {'~' if self.estimated else ''}{self.count:,.0f} comparisons"

    def line(self) -> str:
        """The plan's line, e.g. 'LLM judge on x: ~509 comparisons estimated, $0.62 (all pairs: 156,000 comparisons,
        $190.15)'."""
        most = "budget.max_comparisons's share" if self.capped else self.pairs
        again = f" + {self.repeats:,.0f} asked again for the judge card" if self.repeats else ""
        if not self.estimated:
            return f"{self.name}: {self.count:,.0f} comparisons ({most}){again}, ${self.usd:.2f}"
        return (f"{self.name}: ~{self.count:,.0f} comparisons estimated{again}, ${self.usd:.2f} ({most}: "
                f"{self.most:,.0f} comparisons, ${self.usd_max:.2f})")


def _orders(judge: JudgeConfig) -> int:
    """Judgments per comparison: 2 when both orders are shown."""
    return 2 if judge.both_orders else 1


def judge_costs(cfg: SearchConfig, tests: dict[str, list[Any]], contenders: int) -> list[JudgeCost]:
    """Every LLM judge's comparisons and dollars on each dataset's test rows (`tests`), judged in one planner run over
    all datasets (its judgments spread over them in proportion to their rows), each judge under the same caps."""
    b, examples, pairs = cfg.budget, sum(len(rows) for rows in tests.values()), math.comb(contenders, 2)
    out = []
    for judge in cfg.llm_judges():
        orders = _orders(judge)
        every = pairs * examples * orders
        most = every if b.max_comparisons is None else min(every, b.max_comparisons // orders * orders)
        adaptive = b.strategy == "adaptive"
        total = adaptive_estimate(b, contenders, examples, orders).judgments if adaptive else most
        # the judge card's repeats: a share of the test rating's judgments asked again (tasks/judge/repeat.py)
        again, again_most = judge.repeat_count(int(total)), judge.repeat_count(int(most))
        for name, rows in tests.items():
            share, per = len(rows) / max(examples, 1), judgment_usd(cfg, judge, rows)
            out.append(JudgeCost(f"{judge_name(cfg, judge)} on {name}", total * share, most * share, most < every,
                                 (total + again) * share * per, (most + again_most) * share * per,
                                 adaptive and total < most, dataset=name, model=str(judge.model),
                                 repeats=again * share))
    return out


def validation_costs(cfg: SearchConfig, name: str, rows: list[Any]) -> list[JudgeCost]:
    """Every LLM judge on the held-out rows: the winner against each opponent and the teacher, every row (the pairs
    validation reports: flows/search.py validate_winner), within budget.max_comparisons."""
    assert cfg.validation is not None
    out = []
    for judge in cfg.llm_judges():
        every = (1 + len(cfg.validation.baselines)) * len(rows) * _orders(judge)
        cap = cfg.budget.max_comparisons
        count = every if cap is None else min(every, cap // _orders(judge) * _orders(judge))
        per = judgment_usd(cfg, judge, rows)
        out.append(JudgeCost(f"{judge_name(cfg, judge)} on {name}", count, count, count < every, count * per,
                             count * per, False, "the winner's pairs", name,
                             str(judge.model)))
    return out


def judge_assumption(cfg: SearchConfig, contenders: int, examples: int) -> str:
    """The plan's assumption line for the LLM judges: what is paid, and how adaptive judging is estimated."""
    combined = any(j.kind == "combined" for j in cfg.llm_judges())
    text = ("judge: every comparison is counted as a paid request; identical outputs tie without one" +
            (", the combined judge pays only where the metric ties (rows without `expected`, or equal scores)"
             if combined else ""))
    if cfg.budget.strategy != "adaptive":
        return text + ", so the dollars are an upper bound"
    orders = _orders(cfg.llm_judges()[0])
    est = adaptive_estimate(cfg.budget, contenders, examples, orders)
    wins = 1 / (1 + 10 ** (-ASSUMED_GAP_ELO / 400))  # the leader's share of wins against the runner-up: 64%
    return (text + f"; adaptive judging is estimated for a leader {ASSUMED_GAP_ELO:.0f} Elo ({wins:.0%} of wins) "
            f"ahead of the runner-up: the warm-up ({est.warmup:,} comparisons) + {SHARED:g} x the {est.direct:,.0f} "
            f"that separate the two at {cfg.budget.confidence:.0%} over {est.looks} looks, rounded up to a look: "
            f"~{est.judgments:,} of {math.comb(contenders, 2) * examples * orders:,} (all pairs); a closer race "
            "judges more, and judging stops at budget.max_usd and budget.max_comparisons")


def judge_name(cfg: SearchConfig, judge: JudgeConfig) -> str:
    """How the plan names an LLM judge: 'LLM judge', or with its model when there are several."""
    kind = "combined judge" if judge.kind == "combined" else "LLM judge"
    return f"{kind} {judge.model}" if len(cfg.llm_judges()) > 1 else kind
