"""Two small lm-eval tasks over local files, for the tests that run the task gate: a
multiple-choice task (qpipe_mc, accuracy) and a generation task (qpipe_gen, exact match after
lm-eval's remove_whitespace filter, 3-shot), each an lm-eval task YAML with `dataset_path: json`."""

from __future__ import annotations

import json
from pathlib import Path

MULTIPLE_CHOICE = [
    ("Which keyword defines a function in Python?", ["def", "func", "function", "lambda:"], 0),
    ("Which built-in returns the length of a list?", ["len", "size", "count", "length"], 0),
    ("Which keyword leaves a loop early?", ["break", "stop", "exit", "halt"], 0),
    ("What does the print function do?", ["writes text to the screen", "deletes a file", "sorts a list",
                                          "opens a socket"], 0),
    ("Which type holds key-value pairs?", ["dict", "tuple", "str", "int"], 0),
    ("Which keyword starts a class definition?", ["class", "struct", "object", "type"], 0),
    ("Which statement handles exceptions?", ["try", "catch", "guard", "rescue"], 0),
    ("Which keyword imports a module?", ["import", "include", "require", "using"], 0),
    ("Which value means nothing in Python?", ["None", "null", "nil", "void"], 0),
    ("Which keyword returns a value from a function?", ["return", "give", "yield back", "send"], 0),
]
GENERATION = [
    ("What is 2 + 2?", "4"), ("What is the capital of France?", "Paris"),
    ("What color is the sky on a clear day?", "Blue"), ("How many days are in a week?", "7"),
    ("What is 10 minus 3?", "7"), ("Which animal barks?", "Dog"), ("What is 3 + 5?", "8"),
    ("What is the capital of Italy?", "Rome"), ("What color is grass?", "Green"),
    ("How many legs does a cat have?", "4"), ("What is the opposite of hot?", "Cold"), ("What is 6 + 3?", "9"),
]
MC_YAML = """task: qpipe_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: tasks/mc.jsonl
output_type: multiple_choice
test_split: test
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_choice: "{{choices}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
GEN_YAML = """task: qpipe_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: tasks/gen.jsonl
output_type: generate_until
test_split: test
fewshot_split: test
doc_to_text: "Q: {{question}}\\nA:"
doc_to_target: "{{answer}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
filter_list:
  - name: strip
    filter:
      - function: remove_whitespace
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: true
"""
# params.yaml's `tasks` for both (the generation task 3-shot: the instruct model then answers in one word)
PARAMS = """tasks:
  - {name: qpipe_mc}
  - {name: qpipe_gen, num_fewshot: 3}
"""


def write_tasks(root: Path, *, gen_yaml: str = GEN_YAML) -> Path:
    """The two tasks under root/tasks/ (paths in the YAMLs are relative to root, the project root)."""
    tasks = root / "tasks"
    tasks.mkdir(parents=True, exist_ok=True)
    (tasks / "mc.jsonl").write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n"
                                            for q, c, a in MULTIPLE_CHOICE))
    (tasks / "gen.jsonl").write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in GENERATION))
    (tasks / "qpipe_mc.yaml").write_text(MC_YAML)
    (tasks / "qpipe_gen.yaml").write_text(gen_yaml)
    return tasks
