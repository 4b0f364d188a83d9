"""User task files (JSONL): loading, defaults, and errors that name file and line."""

import json

import pytest

from components.tasks import PROMPT_TEMPLATE, TaskFileError, load_task_file, verify


def _write(tmp_path, lines):
    path = tmp_path / "tasks.jsonl"
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_valid_file_loads_with_defaults(tmp_path):
    path = _write(
        tmp_path,
        [
            {"prompt": "Capital of France?", "answer": "Paris"},
            "",
            {"prompt": "2/3 as a decimal?", "answer": 0.6667, "verifier": "numeric", "tolerance": 0.001},
            {"prompt": "Expand (x+1)^2", "answer": "x**2+2*x+1", "verifier": "symbolic"},
        ],
    )
    problems = load_task_file(path)
    assert [p.verifier for p in problems] == ["exact", "numeric", "symbolic"]
    assert [p.answer for p in problems] == ["Paris", "0.6667", "x**2+2*x+1"]
    assert problems[1].tolerance == 0.001 and problems[0].tolerance is None
    assert problems[0].prompt == PROMPT_TEMPLATE.format(question="Capital of France?")
    assert problems[1].meta == {"source": f"{path}:3"}
    assert verify(problems[1], "<answer>2/3</answer>").correct is True
    assert verify(problems[0], "<answer>Lyon</answer>").correct is False


def test_user_tasks_have_no_worked_completion(tmp_path):
    problem = load_task_file(_write(tmp_path, [{"prompt": "q", "answer": "a"}]))[0]
    with pytest.raises(ValueError, match="no worked solution"):
        problem.completion()


@pytest.mark.parametrize(
    ("bad_line", "reason"),
    [
        ('{"prompt": "q", "answer": ', "invalid JSON"),
        ('["q", "a"]', "expected a JSON object"),
        ({"answer": "a"}, "'prompt' must be a non-empty string"),
        ({"prompt": "  ", "answer": "a"}, "'prompt' must be a non-empty string"),
        ({"prompt": "q"}, "'answer' must be a string or a number"),
        ({"prompt": "q", "answer": True}, "'answer' must be a string or a number"),
        ({"prompt": "q", "answer": "a", "verifier": "fuzzy"}, "'verifier' must be one of"),
        ({"prompt": "q", "answer": "a", "tolerance": 0.1}, "'tolerance' applies only"),
        ({"prompt": "q", "answer": "1", "verifier": "numeric", "tolerance": -1}, "finite number >= 0"),
        ({"prompt": "q", "answer": "one", "verifier": "numeric"}, "is not a number"),
        ({"prompt": "q", "answer": "__import__('os')", "verifier": "symbolic"}, "not accepted by verifier symbolic"),
        ({"prompt": "q", "answer": "a", "tolerence": 1}, "unknown field(s) ['tolerence']"),
        ({"prompt": "first", "answer": "again"}, "duplicate prompt (same as line 1)"),
    ],
)
def test_bad_line_raises_naming_file_line_and_reason(tmp_path, bad_line, reason):
    path = _write(tmp_path, [{"prompt": "first", "answer": "1"}, bad_line])
    with pytest.raises(TaskFileError) as info:
        load_task_file(path)
    message = str(info.value)
    assert message.startswith(f"{path}:2: ") and reason in message, message


def test_file_without_tasks_is_an_error(tmp_path):
    with pytest.raises(TaskFileError, match="no tasks"):
        load_task_file(_write(tmp_path, ["", "  "]))
