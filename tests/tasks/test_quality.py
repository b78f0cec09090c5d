"""The labelled questions the benchmark asks each model (`tasks.quality`): a set per task type, and
answers scored as each task type reads them."""


def test_labelled_answers_are_scored_by_task_type():
    import operator
    import re

    from tasks.quality import is_right, load_set, per_task_type

    items = load_set()
    chosen = per_task_type(items, 2)
    assert [i["task_type"] for i in chosen].count("math") == 2 and len(chosen) == 6
    choice = {"task_type": "multiple_choice", "accept": ["B"]}
    assert is_right(choice, "B) steam") and not is_right(choice, "A") and not is_right(choice, "")
    math = {"task_type": "math", "accept": ["282"]}
    assert is_right(math, "94 times 3 is 282.") and not is_right(math, "It is 28.")
    fact = {"task_type": "factual_qa", "accept": ["Au"]}
    assert is_right(fact, "The symbol is Au.") and not is_right(fact, "because gold")  # a word, not a substring
    ops = {"plus": operator.add, "minus": operator.sub, "times": operator.mul}
    for item in (i for i in items if i["task_type"] == "math"):  # the generated results are right
        a, op, b = re.fullmatch(r"What is (\d+) (\w+) (\d+)\?", item["question"]).groups()
        assert item["accept"] == [str(ops[op](int(a), int(b)))]
