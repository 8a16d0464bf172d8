"""The on-disk journal behind the tracking logger: order, durable delivered position, torn lines, params."""

from argparse import Namespace
from dataclasses import dataclass

from mlflow.utils.validation import MAX_ENTITY_KEY_LENGTH, _validate_param_name

from app.tracking.journal import Journal
from app.tracking.params import flatten_params, sanitize_key, split_params


def test_journal_keeps_order_and_resumes_after_the_delivered_position(tmp_path):
    path = str(tmp_path / "run.jsonl")
    journal = Journal(path)
    journal.append([["m", "loss", float(i), 1000 + i, i] for i in range(10)])
    assert journal.peek(4) == [["m", "loss", float(i), 1000 + i, i] for i in range(4)]
    journal.commit(3)  # three delivered; the fourth was peeked but not delivered
    journal.append([["t", "k", "v"]])
    journal._writer.close()  # the process dies without close()
    reopened = Journal(path)
    assert reopened.pending_at_open == 8
    records = reopened.peek(100)
    assert [r[0] for r in records] == ["m"] * 7 + ["t"] and records[0][2] == 3.0
    reopened.commit(8)
    reopened.close()
    assert not (tmp_path / "run.jsonl").exists()  # fully delivered journals are removed


def test_a_torn_last_line_costs_only_that_record(tmp_path):
    path = tmp_path / "run.jsonl"
    path.write_bytes(b'["m","a",1.0,1,0]\n["m","a",2.0,2,1]\n["m","a",3.0,3')  # died mid-write
    journal = Journal(str(path))
    journal.append([["m", "a", 4.0, 4, 3]])
    assert journal.peek(10) == [["m", "a", 1.0, 1, 0], ["m", "a", 2.0, 2, 1], None, ["m", "a", 4.0, 4, 3]]
    journal.commit(4)
    assert not journal.has_pending


@dataclass
class _Stage:
    name: str
    tokens: int


def test_flatten_params_walks_dicts_dataclasses_namespaces_and_lists_of_them():
    flat = flatten_params({"a": {"b": {"c": 1}}, "ns": Namespace(x=None, y=[1, 2]),
                           "stages": [_Stage("warmup", 10), _Stage("stable", 20)], "bad key!": 0.5})
    assert flat == {"a.b.c": "1", "ns.x": "None", "ns.y": "[1, 2]", "stages.0.name": "warmup",
                    "stages.0.tokens": "10", "stages.1.name": "stable", "stages.1.tokens": "20", "bad key_": "0.5"}
    long = flatten_params({"v": "x" * 10_000})["v"]
    assert len(long) == 6000 and long.endswith("...")


def test_sanitized_keys_are_valid_and_long_keys_stay_distinct():
    for raw, clean in [("a//b/../c", "a/_/b/_/c"), ("/lead", "_/lead"), ("x$y%", "x_y_"), ("", "_")]:
        assert sanitize_key(raw) == clean
        _validate_param_name(clean)  # MLflow's own check accepts it
    a, b = sanitize_key("k" * 300 + "1"), sanitize_key("k" * 300 + "2")
    assert len(a) == len(b) == MAX_ENTITY_KEY_LENGTH and a != b


def test_split_params_skips_unchanged_and_tags_changed_values():
    to_log, changed = split_params({"lr": "0.004", "wd": "0.1", "new": "1"}, {"lr": "0.002", "wd": "0.1"})
    assert to_log == {"new": "1"}
    assert changed == {"param_changed.lr": "0.004"}
