"""A study's end: why it stopped and the share of its budget it used (search.budget)."""

import pytest

from search import Dataset, Study
from search.budget import budget_record, budget_text, describe_budget, stop_reason


def study(**changes) -> Study:
    return Study(name="b", dataset=Dataset(loader="embedded"), space=lambda trial: {}, **changes)


def test_an_open_ended_study_needs_a_time_limit_and_is_valid_with_one():
    assert study(num_samples=None, time_limit_s=60).num_samples is None


@pytest.mark.parametrize("changes, trials, elapsed, kwargs, expected", [
    ({"num_samples": 4}, 4, 10.0, {}, "num_samples"),
    ({"num_samples": 4}, 3, 10.0, {}, None),  # fewer than planned, no reason: cut off
    ({"num_samples": 4}, 4, 10.0, {"cut_off": True}, None),  # trials were interrupted
    ({"num_samples": 4}, 2, 10.0, {"space_exhausted": True}, "space_exhausted"),
    ({"num_samples": 4, "time_limit_s": 10}, 2, 10.0, {"cut_off": True}, "time_limit"),  # the limit stops trials
    ({"num_samples": 4, "time_limit_s": 10}, 4, 5.0, {}, "num_samples"),
    ({"num_samples": None, "time_limit_s": 10}, 9, 5.0, {}, None),  # open-ended, before its limit: cut off
    ({"num_samples": None, "time_limit_s": 10}, 9, 10.2, {}, "time_limit"),
])
def test_the_reason_a_run_stopped(changes, trials, elapsed, kwargs, expected):
    assert stop_reason(study(**changes), trials, elapsed, **kwargs) == expected


def test_the_end_line_gives_the_reason_the_trials_and_the_share_of_the_time_limit():
    s = study(num_samples=None, time_limit_s=7200)
    record = budget_record(s, 37, 7203.4, "time_limit")
    assert record == {"stopped_because": "time_limit", "search_s": 7203.4, "budget_used": 1.0, "trials_run": 37}
    assert budget_text(record, None, 7200) == ("stopped because its time limit was spent: 37 trial(s), "
                                               "2.00 h of search, 100% of the time limit (2.00 h)")
    capped = budget_record(study(num_samples=16, time_limit_s=1800), 16, 1620.0, "num_samples")
    assert budget_text(capped, 16, 1800) == ("stopped because every planned trial ran: 16 trial(s) of 16, "
                                             "27.0 min of search, 90% of the time limit (30.0 min)")
    cut = budget_record(study(num_samples=16), 5, 30.0, None)
    assert budget_text(cut, 16, None) == ("stopped because it was cut off before its end (--resume continues it): "
                                          "5 trial(s) of 16, 30 s of search")


def test_the_plan_in_words():
    assert describe_budget(16, 10, 1800) == "16 trials x at most 10 epochs, time limit 30.0 min"
    assert describe_budget(None, 10, 7200) == ("trials until the time limit (2.00 h) is spent, "
                                             "each at most 10 epochs")
    assert describe_budget(4, 3, None) == "4 trials x at most 3 epochs"
