"""Cascades (`tasks.cascade`): what counts as a valid code answer, when a plan accepts a probe's
answer, asks the next probe or escalates, and the plan used where no cascade was learned."""


def test_a_code_cascade_escalates_answers_that_are_not_valid_code(tmp_path):
    from tasks.cascade import CascadePlan, is_valid

    assert is_valid("code", "", "Here:\n```python\ndef f(x):\n    return x\n```")
    assert not is_valid("code", "", "```python\ndef f(x) return x\n```")  # does not parse
    assert not is_valid("code", "", "```python\nprint(1)\n```")  # defines no function
    plan = CascadePlan(["cheap-a", "cheap-b"], 1, "validity", "big")
    assert plan.step(["x"], [False]) == ("ask", None)
    assert plan.step(["x", "y"], [False, True]) == ("accept", 1)
    assert plan.step(["x", "y"], [False, False]) == ("escalate", None)
    vote = CascadePlan(["a", "b", "c"], 2, "agreement", "big")
    assert vote.step(["A", "A"], [True, True]) == ("accept", 0)  # stops early: the third is not asked
    assert vote.step(["A", "B"], [True, True]) == ("ask", None)
    assert vote.step(["A", "B", "C"], [True] * 3) == ("escalate", None)
    assert vote.step(["", ""], [False, False]) == ("escalate", None)  # no answers: 2 votes are out of reach


def test_without_training_records_two_cheap_models_must_agree_or_one_must_write_valid_code():
    from tasks.cascade import CascadePlan, default_plan

    assert default_plan("math", ["a", "b", "c"], "big") == CascadePlan(["a", "b"], 2, "agreement", "big")
    assert default_plan("multiple_choice", ["a"], "big") is None  # one cheap model has nobody to agree with
    assert default_plan("code", ["a", "b"], "big") == CascadePlan(["a"], 1, "validity", "big")
    assert default_plan("chat", ["a", "b"], "big") is None  # free text gives no signal: the best model at once
