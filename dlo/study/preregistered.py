"""The testbed criterion and the question of docs/STUDY.md, evaluated on the measured rows."""

from __future__ import annotations

import math
import statistics

from dlo.study.config import StudyConfig
from dlo.study.stats import interval
from dlo.study.tables import pm

QUESTION_CAPACITY, KEEP_AT_LEAST, SPEND_AT_MOST = 0.5, 0.8, 0.6
# The mixed-depth testbed (docs/STUDY.md, "The mixed-depth testbed"): DLO must beat every static model with
# the same FLOPs by more than this many seed standard deviations of the paired difference.
MARGIN_SDS = 2.0


def preregistered(rows: list[dict], cfg: StudyConfig, groups: list[str]) -> dict:
    """The testbed criterion and the question of docs/STUDY.md, evaluated on the measured rows.

    ``groups`` is [prompt, easy, ..., hard]: the first answer group is the easy one, the last the hard one. With a
    single answer group (eval.groups empty) the testbed criterion does not apply: its verdict is None.
    """
    by = {(r["name"], r["seed"]): r for r in rows}
    base, dense = cfg.static.base, cfg.static.dense
    seeds = sorted({r["seed"] for r in rows})  # those with base and dense (with_references)
    easy, hard = groups[1], groups[-1]

    def paired(a: str, b: str, key: str, over: list[int] = seeds) -> dict:
        return interval([by[(a, s)][key] - by[(b, s)][key] for s in over])

    mixed = cfg.testbed is not None and cfg.testbed.kind == "mixed"
    # Trained models with the depth of a static alternative (e.g. one zero-init copy, LLaMA-Pro): static arms too.
    trained_static = [a.name for a in cfg.arms if a.kind == "dense" and a.name != dense
                      and all((a.name, s) in by and by[(a.name, s)]["num_layers"] in cfg.static.num_layers
                              for s in seeds)]
    testbed = None
    if len(groups) > 2:  # one answer group (no token classes) has no easy and hard tokens: no testbed criterion
        testbed = _testbed_criterion(by, seeds, paired, base, dense, easy, hard)
        if mixed:
            testbed["checks"] |= _mixed_depth_checks(by, seeds, dense, trained_static, hard)
        testbed["holds"] = all(testbed["checks"].values())
    question = []
    for arm in cfg.arms:
        if arm.kind != "dlo" or arm.recipe["routing"].get("capacity") != QUESTION_CAPACITY:
            continue
        mine = [s for s in seeds if (arm.name, s) in by]
        if len(mine) < 2:  # no interval without two seeds
            continue
        shares = {key: interval([by[(arm.name, s)][key] for s in mine]) for key in ("gain_share", "compute_share")}
        static = [f"shortgpt-{n}L" for n in cfg.static.num_layers]
        static += [f"{arm.name}/usage-{n}L" for n in cfg.static.num_layers]
        static += trained_static if mixed else []
        versus = {name: paired(arm.name, name, "eval_loss", mine) for name in static
                  if all((name, s) in by for s in mine)}
        if mixed:
            checks = {f"beats {name} by more than {MARGIN_SDS:g} seed sd": _margin(d) > MARGIN_SDS
                      for name, d in versus.items()}
        else:
            checks = {f"keeps >= {KEEP_AT_LEAST:.0%} of the gain": shares["gain_share"]["mean"] >= KEEP_AT_LEAST,
                      f"spends <= {SPEND_AT_MOST:.0%} of the added compute":
                          shares["compute_share"]["mean"] <= SPEND_AT_MOST}
            checks |= {f"lower eval loss than {name} (interval below zero)": d["mean"] + d["ci95"] < 0
                       for name, d in versus.items()}
        question.append({"arm": arm.name, "seeds": mine, "label": by[(arm.name, mine[0])]["label"], **shares,
                         "versus": versus,
                         "checks": checks, "yes": all(checks.values())})
    return {"testbed": testbed, "question": question}


def _testbed_criterion(by: dict, seeds: list[int], paired, base: str, dense: str, easy: str, hard: str) -> dict:
    """The depth testbed's four checks: dense gains clearly over base, and hard tokens cost the base more."""
    base_loss = [by[(base, s)]["eval_loss"] for s in seeds]
    gain, hard_gain = paired(base, dense, "eval_loss"), paired(dense, base, f"accuracy_{hard}")
    gap = interval([by[(base, s)][f"loss_{hard}"] - by[(base, s)][f"loss_{easy}"] for s in seeds])
    testbed = {"gain": gain, "gain_relative": gain["mean"] / statistics.fmean(base_loss),
               "hard_accuracy_gain": hard_gain,
               "base_eval_loss_sd": statistics.stdev(base_loss) if len(base_loss) > 1 else math.nan,
               "hard_minus_easy_loss_of_base": gap}
    testbed["checks"] = {
        "gain interval excludes zero": gain["mean"] - gain["ci95"] > 0,
        "gain >= 5% of base eval loss or >= 10 points of hard accuracy":
            testbed["gain_relative"] >= 0.05 or hard_gain["mean"] >= 0.10,
        "gain >= 5 x seed sd of base eval loss": gain["mean"] >= 5 * testbed["base_eval_loss_sd"],
        "base hard-token loss >= easy-token loss + 1 nat": gap["mean"] >= 1.0}
    return testbed


def _margin(difference: dict) -> float:
    """How many seed sds DLO is below a static model: -mean / sd of the paired (DLO - static) difference; +-inf
    when every seed gives the same difference."""
    values = difference["values"]
    sd = statistics.stdev(values) if len(values) > 1 else math.nan
    if sd == 0:
        return math.inf if -difference["mean"] > 0 else -math.inf
    return -difference["mean"] / sd


def _mixed_depth_checks(by: dict, seeds: list[int], dense: str, trained_static: list[str],
                        hard: str) -> dict[str, bool]:
    """The mixed-depth testbed is informative only if the hard group's tokens need the dense model's full depth:
    it learns them, and each trained static model with fewer layers does not (mean over seeds)."""
    def mean(name: str, key: str) -> float:
        return statistics.fmean(by[(name, s)][key] for s in seeds)

    checks = {f"{dense} {hard} accuracy >= 0.8": mean(dense, f"accuracy_{hard}") >= 0.8}
    for name in trained_static:
        gap = mean(name, f"loss_{hard}") - mean(dense, f"loss_{hard}")
        checks[f"{name} {hard} loss >= {dense}'s + 1 nat"] = gap >= 1.0
    return checks


def preregistered_text(verdict: dict) -> str:
    t = verdict["testbed"]
    lines = ["## Pre-registered criterion (docs/STUDY.md)", ""]
    if t is None:
        lines += ["Testbed: the criterion does not apply (one answer group: no easy and hard tokens).", ""]
    else:
        lines += [f"Testbed: dense - base eval-loss gain {pm(t['gain'])} ({t['gain_relative']:.1%} of the base's "
                  f"loss), hard-token accuracy gain {pm(t['hard_accuracy_gain'], 100, 1)} points, seed sd of the "
                  f"base's eval loss {t['base_eval_loss_sd']:.3f}; base hard - easy token loss "
                  f"{pm(t['hard_minus_easy_loss_of_base'])} nats.", ""]
        lines += [f"- {name}: {'yes' if ok else 'NO'}" for name, ok in t["checks"].items()]
        lines += ["", f"The testbed criterion {'holds' if t['holds'] else 'does NOT hold'}.", ""]
    for q in verdict["question"]:
        lines += [f"{q['arm']} ({q['label']}, seeds {q['seeds']}): gain kept {pm(q['gain_share'], 100, 1)}%, "
                  f"added compute {pm(q['compute_share'], 100, 1)}%; eval loss minus "
                  + ", ".join(f"{name} {pm(d)}" for name, d in q["versus"].items()) + ".", ""]
        lines += [f"- {name}: {'yes' if ok else 'NO'}" for name, ok in q["checks"].items()]
        lines += ["", f"Answer for {q['arm']}: {'YES' if q['yes'] else 'NO'}.", ""]
    return "\n".join(lines)
