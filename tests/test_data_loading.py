"""Loading, normalisation and bad-input errors of fedhl_jax.data.loading."""

from __future__ import annotations

import shutil
from pathlib import Path

import datasets
import pytest

from fedhl_jax.data import loading
from fedhl_jax.data.loading import (
    DATA_DIR_ENV,
    DataSource,
    DataError,
    default_data_dir,
    load_instruction_dataset,
    resolve_data_dir,
    validate_json_file,
)

FIX = Path(__file__).parent / "fixtures" / "data"


def _load(name: str, file: str, **kw) -> datasets.Dataset:
    return load_instruction_dataset(DataSource(name, path=str(FIX / file), **kw))


def test_gsm8k_normalised():
    ds = _load("gsm8k", "gsm8k_small.jsonl")
    assert ds.column_names == ["instruction", "input", "output"]
    assert len(ds) == 8
    row = ds[0]
    assert row["instruction"].startswith("Tom has 3 apples")
    assert row["input"] == ""
    assert row["output"].endswith("#### 7")


def test_codealpaca_normalised():
    ds = _load("codealpaca", "codealpaca_small.jsonl")
    assert ds.column_names == ["instruction", "input", "output"]
    assert len(ds) == 10
    assert ds[3]["input"] == "a = 2, b = 3"
    assert ds[0]["input"] == ""


def test_dolly_keeps_category_and_maps_context():
    ds = _load("dolly", "dolly_small.jsonl")
    assert ds.column_names == ["instruction", "input", "output", "category"]
    assert ds[1]["input"].startswith("The quick brown fox")
    assert ds[1]["output"].startswith("A fox jumped")
    assert ds[1]["category"] == "summarization"


def test_dolly_without_category():
    ds = _load("dolly", "dolly_nocat.jsonl")
    assert ds.column_names == ["instruction", "input", "output"]
    assert len(ds) == 8


def test_json_array_file():
    ds = _load("codealpaca", "codealpaca_array.json")
    assert len(ds) == 3
    assert ds[2]["output"].startswith("public class Hello")


def test_max_examples():
    assert len(_load("gsm8k", "gsm8k_small.jsonl", max_examples=3)) == 3


def test_relative_path_against_data_dir_argument():
    ds = load_instruction_dataset(DataSource("gsm8k", path="gsm8k_small.jsonl", data_dir=str(FIX)))
    assert len(ds) == 8


def test_env_var_data_dir(monkeypatch):
    monkeypatch.setenv(DATA_DIR_ENV, str(FIX))
    assert resolve_data_dir() == FIX.resolve()
    ds = load_instruction_dataset(DataSource("dolly", path="dolly_small.jsonl"))
    assert len(ds) == 8


def test_argument_beats_env_var(monkeypatch, tmp_path):
    monkeypatch.setenv(DATA_DIR_ENV, str(FIX))
    assert resolve_data_dir(tmp_path) == tmp_path.resolve()


def test_default_split_files(tmp_path):
    (tmp_path / "gsm8k").mkdir()
    shutil.copy(FIX / "gsm8k_small.jsonl", tmp_path / "gsm8k" / "test.jsonl")
    ds = load_instruction_dataset(DataSource("gsm8k", split="test", data_dir=str(tmp_path)))
    assert len(ds) == 8


def test_multiple_files():
    cfg = DataSource(
        "codealpaca", path=(str(FIX / "codealpaca_small.jsonl"), str(FIX / "codealpaca_array.json"))
    )
    assert len(load_instruction_dataset(cfg)) == 13


def test_default_data_dir_is_repo_sibling():
    repo = Path(loading.__file__).resolve().parents[2]
    assert default_data_dir() == repo.parent / "shared" / "data"


# ---------------------------------------------------------------- hub route


def _fake_hub(monkeypatch, table: dict, calls: list):
    def fake_load_dataset(path, name=None, split=None, cache_dir=None, **kw):
        calls.append((path, name, split))
        return datasets.Dataset.from_dict(table)

    monkeypatch.setattr(loading.datasets, "load_dataset", fake_load_dataset)


def test_hub_route_uses_default_id_and_config(monkeypatch):
    calls: list = []
    _fake_hub(monkeypatch, {"question": ["q1", "q2"], "answer": ["a #### 1", "b #### 2"]}, calls)
    ds = load_instruction_dataset(DataSource("gsm8k", source="hub", split="test"))
    assert calls == [("openai/gsm8k", "main", "test")]
    assert ds.column_names == ["instruction", "input", "output"]
    assert ds["instruction"][:] == ["q1", "q2"]


def test_hub_route_dolly_category(monkeypatch):
    calls: list = []
    table = {
        "instruction": ["i1", "i2"], "context": ["", "c"], "response": ["r1", "r2"],
        "category": ["open_qa", "closed_qa"],
    }
    _fake_hub(monkeypatch, table, calls)
    ds = load_instruction_dataset(DataSource("dolly", source="hub"))
    assert calls == [("databricks/databricks-dolly-15k", None, "train")]
    assert ds["category"][:] == ["open_qa", "closed_qa"]
    assert ds["input"][:] == ["", "c"]


def test_hub_route_custom_id(monkeypatch):
    calls: list = []
    _fake_hub(monkeypatch, {"instruction": ["i"], "input": [""], "output": ["o"]}, calls)
    load_instruction_dataset(DataSource("codealpaca", source="hub", hub_id="me/my-code"))
    assert calls == [("me/my-code", None, "train")]


def test_hub_missing_column(monkeypatch):
    _fake_hub(monkeypatch, {"question": ["q"]}, [])
    with pytest.raises(DataError, match=r"openai/gsm8k.*missing required field.*'answer'"):
        load_instruction_dataset(DataSource("gsm8k", source="hub"))


# ---------------------------------------------------------------- bad input


def test_missing_file_is_named(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match="data file not found") as e:
        load_instruction_dataset(DataSource("gsm8k", path=str(missing)))
    assert str(missing) in str(e.value)


def test_missing_default_file_is_named(tmp_path):
    with pytest.raises(DataError) as e:
        load_instruction_dataset(DataSource("dolly", data_dir=str(tmp_path)))
    assert "dolly_subset_151.jsonl" in str(e.value)


def test_missing_data_dir(tmp_path):
    with pytest.raises(DataError, match="does not exist") as e:
        resolve_data_dir(tmp_path / "absent")
    assert "absent" in str(e.value)


def test_malformed_json_reports_file_and_line():
    with pytest.raises(DataError, match=r"bad_json\.jsonl: line 3: malformed JSON"):
        _load("codealpaca", "bad_json.jsonl")


def test_missing_field_reports_field_file_and_line():
    with pytest.raises(DataError, match=r"missing_field\.jsonl: line 2: missing required field 'output'"):
        _load("codealpaca", "missing_field.jsonl")


def test_wrong_type_reports_field_and_line():
    msg = r"wrong_type\.jsonl: line 3: field 'answer' must be a string, got int"
    with pytest.raises(DataError, match=msg):
        _load("gsm8k", "wrong_type.jsonl")


def test_schema_mismatch_names_field():
    # A CodeAlpaca file read as GSM8K lacks "question".
    msg = r"codealpaca_small\.jsonl: line 1: missing required field 'question'"
    with pytest.raises(DataError, match=msg):
        _load("gsm8k", "codealpaca_small.jsonl")


def test_not_an_object():
    with pytest.raises(DataError, match=r"not_object\.jsonl: line 2: expected a JSON object, got list"):
        _load("gsm8k", "not_object.jsonl")


def test_empty_file():
    with pytest.raises(DataError, match=r"empty\.jsonl: empty dataset"):
        _load("gsm8k", "empty.jsonl")


def test_malformed_json_array(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[\n {"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}\n]')
    with pytest.raises(DataError, match=r"bad\.json: line 3: malformed JSON"):
        validate_json_file(bad, ["instruction", "output"])


def test_json_array_missing_field_reports_row(tmp_path):
    bad = tmp_path / "rows.json"
    bad.write_text('[{"instruction": "a", "output": "b"}, {"instruction": "c"}]')
    with pytest.raises(DataError, match=r"rows\.json: row 1: missing required field 'output'"):
        validate_json_file(bad, ["instruction", "output"])


def test_null_optional_field_becomes_empty(tmp_path):
    f = tmp_path / "nulls.jsonl"
    f.write_text('{"instruction": "a", "input": null, "output": "b"}\n{"instruction": "c", "output": "d"}\n')
    ds = load_instruction_dataset(DataSource("codealpaca", path=str(f)))
    assert ds["input"][:] == ["", ""]


def test_bad_optional_type(tmp_path):
    f = tmp_path / "opt.jsonl"
    f.write_text('{"instruction": "a", "input": 3, "output": "b"}\n')
    with pytest.raises(DataError, match=r"opt\.jsonl: line 1: field 'input' must be a string or null"):
        load_instruction_dataset(DataSource("codealpaca", path=str(f)))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"name": "alpaca"}, "unknown dataset name 'alpaca'"),
        ({"name": "gsm8k", "source": "web"}, "unknown data source 'web'"),
        ({"name": "gsm8k", "split": "validation"}, "unknown local split 'validation'"),
        ({"name": "gsm8k", "max_examples": 0}, "max_examples must be >= 1"),
    ],
)
def test_bad_config(kwargs, message):
    with pytest.raises(DataError, match=message):
        DataSource(**kwargs)


# ---------------------------------------------------------------- where the files come from


@pytest.fixture
def no_shared(monkeypatch, tmp_path):
    """No $FEDHL_DATA_DIR and an empty ../shared/data; the Hub must not be called."""
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    monkeypatch.setattr(loading, "default_data_dir", lambda: tmp_path / "no_shared")
    real = loading.datasets.load_dataset

    def local_only(path, *args, **kw):
        assert path == "json", f"the Hub was asked for {path!r}"
        return real(path, *args, **kw)

    monkeypatch.setattr(loading.datasets, "load_dataset", local_only)
    return tmp_path / "no_shared"


def test_gsm8k_defaults_to_embedded_copy(no_shared):
    from fedhl_jax.assets import ASSETS_DIR

    train = loading.resolve_data_files("gsm8k")
    assert train.source == "local" and train.origin == "embedded"
    assert train.files == (ASSETS_DIR / "gsm8k" / "train.jsonl",)
    assert "embedded" in train.description
    test = loading.resolve_data_files("gsm8k", split="test")
    assert test.files == (ASSETS_DIR / "gsm8k" / "test.jsonl",)
    ds = load_instruction_dataset(DataSource("gsm8k", split="test", max_examples=5))
    assert len(ds) == 5 and ds[0]["output"].rstrip().split("#### ")[-1].strip().isdigit()
    assert len(load_instruction_dataset(test.data_config(max_examples=3))) == 3


def test_embedded_gsm8k_is_complete():
    from fedhl_jax.assets import ASSETS_DIR

    for split, rows in (("train", 7473), ("test", 1319)):
        f = ASSETS_DIR / "gsm8k" / f"{split}.jsonl"
        assert validate_json_file(f, ["question", "answer"]) == rows
    assert (ASSETS_DIR / "gsm8k" / "LICENSE").read_text().startswith("MIT License")
    assert "3101c7d5072418e28b9008a6636bde82a006892c" in (ASSETS_DIR / "gsm8k" / "PROVENANCE.md").read_text()


@pytest.mark.parametrize("name", ["codealpaca", "dolly"])
def test_not_embedded_dataset_missing_is_a_clear_error(no_shared, name):
    with pytest.raises(DataError) as e:
        loading.resolve_data_files(name)
    msg = str(e.value)
    assert "not embedded" in msg and str(no_shared) in msg
    assert "data.data_dir" in msg and DATA_DIR_ENV in msg and "data.source=hub" in msg
    with pytest.raises(DataError, match="not embedded"):
        load_instruction_dataset(DataSource(name))


def test_missing_data_dir_names_path_and_fixes(no_shared, tmp_path):
    absent = tmp_path / "absent"
    with pytest.raises(DataError) as e:
        loading.resolve_data_files("gsm8k", data_dir=absent)
    msg = str(e.value)
    assert str(absent) in msg and "does not exist" in msg and "data.data_dir" in msg
    assert DATA_DIR_ENV in msg and "data.source=hub" in msg
    with pytest.raises(DataError, match="absent"):  # never the embedded copy instead
        load_instruction_dataset(DataSource("gsm8k", data_dir=str(absent)))


def test_missing_env_data_dir_is_an_error(no_shared, monkeypatch, tmp_path):
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "gone"))
    with pytest.raises(DataError, match=rf"gone.*from \${DATA_DIR_ENV}.*does not exist"):
        loading.resolve_data_files("gsm8k")


def test_data_dir_without_the_file(no_shared, tmp_path):
    with pytest.raises(DataError) as e:
        loading.resolve_data_files("gsm8k", data_dir=tmp_path, split="test")
    assert str(tmp_path / "gsm8k" / "test.jsonl") in str(e.value) and "data.source=hub" in str(e.value)


def test_data_dir_and_env_beat_embedded(no_shared, monkeypatch, tmp_path):
    (tmp_path / "gsm8k").mkdir()
    shutil.copy(FIX / "gsm8k_small.jsonl", tmp_path / "gsm8k" / "train.jsonl")
    got = loading.resolve_data_files("gsm8k", data_dir=tmp_path)
    assert got.origin == "data_dir" and got.files == (tmp_path.resolve() / "gsm8k" / "train.jsonl",)
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    got = loading.resolve_data_files("gsm8k")
    assert got.origin == f"${DATA_DIR_ENV}"
    assert len(load_instruction_dataset(got.data_config())) == 8


def test_file_as_source(no_shared, tmp_path, monkeypatch):
    got = loading.resolve_data_files("gsm8k", source=str(FIX / "gsm8k_small.jsonl"))
    assert got.origin == "path" and len(load_instruction_dataset(got.data_config())) == 8
    monkeypatch.chdir(FIX)
    assert loading.resolve_data_files("gsm8k", source="gsm8k_small.jsonl").files == (FIX / "gsm8k_small.jsonl",)
    with pytest.raises(DataError, match=r"data file not found: .*nope\.jsonl.*data\.source=hub"):
        loading.resolve_data_files("gsm8k", source=str(tmp_path / "nope.jsonl"))


def test_hub_only_when_asked(monkeypatch, no_shared):
    got = loading.resolve_data_files("gsm8k", source="hub", split="test")
    assert (got.source, got.hub_id, got.hub_config, got.files) == ("hub", "openai/gsm8k", "main", ())
    calls: list = []
    _fake_hub(monkeypatch, {"question": ["q"], "answer": ["a #### 1"]}, calls)
    load_instruction_dataset(got.data_config())
    assert calls == [("openai/gsm8k", "main", "test")]


def test_resolve_rejects_unknown_names():
    with pytest.raises(DataError, match="unknown dataset name 'alpaca'"):
        loading.resolve_data_files("alpaca")
    with pytest.raises(DataError, match="unknown local split 'validation'"):
        loading.resolve_data_files("gsm8k", split="validation")


# --------------------------------------------------------------------- the dataset registry

import json  # noqa: E402

import numpy as np  # noqa: E402

from fedhl_jax.config import load_config  # noqa: E402
from fedhl_jax.data import build_federated_dataset, dataset_labels, word_level_tokenizer  # noqa: E402
from fedhl_jax.data.registry import (DatasetSpec, dataset_names, dataset_spec, register_dataset,  # noqa: E402
                                     unregister_dataset)
from fedhl_jax.evaluator import eval_metric  # noqa: E402


def _length_label(records) -> list:
    return ["long" if len(r.split()) > 3 else "short" for r in records[:]["instruction"]]


TOY = DatasetSpec(
    name="toy_qa", instruction="prompt", output="reply", input="notes",
    local_files={"train": ("toy/train.jsonl",), "heldout": ("toy/heldout.jsonl",)},
    label_kinds={"length": _length_label}, eval_split="heldout", metric="exact_match")


@pytest.fixture
def toy_dir(tmp_path):
    """A data folder with the toy dataset's two files; the spec registered for the test only."""
    (tmp_path / "toy").mkdir()
    rows = [{"prompt": f"question {i} " + "word " * (i % 4), "reply": f"answer {i}",
             **({"notes": f"note {i}"} if i % 2 else {})} for i in range(24)]
    (tmp_path / "toy" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "toy" / "heldout.jsonl").write_text(
        "".join(json.dumps({"prompt": f"held {i}", "reply": f"out {i}"}) + "\n" for i in range(5)))
    register_dataset(TOY)
    yield tmp_path
    unregister_dataset(TOY.name)


def test_a_registered_dataset_trains_end_to_end(toy_dir):
    """Adding a dataset is one spec: the config accepts it, the loader, the labels, the held-out split
    and the metric all come from the spec."""
    cfg = load_config(None, ["data.dataset=toy_qa", f"data.data_dir={toy_dir}", "data.partition=dirichlet",
                             "data.label_kind=length", "data.eval_examples=4", "data.seq_len=96"])
    texts = [json.loads(line)["prompt"] for line in (toy_dir / "toy" / "train.jsonl").read_text().splitlines()]
    tok = word_level_tokenizer(texts + ["held out answer note Instruction Input Response ###"],
                               extra_words=[str(i) for i in range(30)])
    fed = build_federated_dataset(cfg.data, tok, num_clients=3, seed=0, pad_id=0)
    assert len(fed.records) == 24 and fed.records.column_names == ["instruction", "input", "output"]
    assert fed.records[1]["input"] == "note 1" and fed.records[0]["input"] == ""  # notes -> input, missing -> ""
    assert fed.records[0]["output"] == "answer 0"
    assert len(fed.eval) == 4  # the spec's eval_split file, not a slice of the training rows
    assert len(fed.data) == 24 and sorted(set(fed.labels)) == ["long", "short"]
    np.testing.assert_array_equal(fed.labels, np.asarray(_length_label(fed.records), object)[fed.data.source_index])
    assert sorted(np.concatenate(fed.partitions).tolist()) == list(range(len(fed.data)))
    assert eval_metric("toy_qa") == "exact_match"
    assert dataset_names()[-1] == "toy_qa"


def test_registry_refuses_bad_specs_and_duplicates(toy_dir):
    with pytest.raises(DataError, match="dataset 'toy_qa' is registered already"):
        register_dataset(TOY)
    with pytest.raises(DataError, match=r"dataset spec 'x': metric must be one of \['exact_match', 'rouge_l'\], got 'bleu'"):
        DatasetSpec("x", "q", "a", local_files={"train": ("x.jsonl",)}, metric="bleu")
    with pytest.raises(DataError, match=r"dataset spec 'x': needs local_files\['train'\] or a hub_id"):
        DatasetSpec("x", "q", "a")
    with pytest.raises(DataError, match=r"dataset spec 'x': eval_split 'test' is not one of its local splits"):
        DatasetSpec("x", "q", "a", local_files={"train": ("x.jsonl",)}, eval_split="test")
    with pytest.raises(DataError, match=r"dataset spec 'x': a source field is used twice"):
        DatasetSpec("x", "q", "q", local_files={"train": ("x.jsonl",)})
    with pytest.raises(DataError, match=r"unknown dataset name 'nope'; expected one of \['gsm8k', 'codealpaca', 'dolly', 'toy_qa'\]"):
        dataset_spec("nope")
    with pytest.raises(TypeError):
        dataset_spec("toy_qa").local_files["test"] = ("x",)  # read-only once registered


def test_a_dataset_without_label_kinds_or_hub_id(tmp_path):
    spec = register_dataset(DatasetSpec("plain_qa", "q", "a", local_files={"train": ("p.jsonl",)}))
    try:
        assert dataset_labels("plain_qa", [{"instruction": "x"}] * 3).tolist() == ["all"] * 3
        assert eval_metric("plain_qa") == "rouge_l" and spec.default_label_kind is None
        with pytest.raises(DataError, match="dataset 'plain_qa' has no Hugging Face Hub id"):
            loading.resolve_data_files("plain_qa", source="hub")
        with pytest.raises(Exception, match=r"data.label_kind must be one of \[\] for data.dataset='plain_qa'"):
            load_config(None, ["data.dataset=plain_qa", "data.label_kind=steps"])
    finally:
        unregister_dataset("plain_qa")
    assert "plain_qa" not in dataset_names()


def test_shipped_specs_hold_what_the_tables_held():
    g, c, d = dataset_spec("gsm8k"), dataset_spec("codealpaca"), dataset_spec("dolly")
    assert (g.required, g.optional_text, g.eval_split, g.metric, g.embedded) == (("question", "answer"), (), "test",
                                                                                  "exact_match", True)
    assert (c.hub_id, c.hub_config, sorted(c.local_files)) == ("sahil2801/CodeAlpaca-20k", None, ["all", "new", "train"])
    assert (d.optional_text, list(d.label_kinds), d.metric) == (("context", "category"), ["category", "derived", "context"],
                                                               "rouge_l")
    assert (g.hub_id, g.hub_config, list(g.label_kinds)) == ("openai/gsm8k", "main", ["steps", "answer_size"])
