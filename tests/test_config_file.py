"""load_config: YAML files that are malformed, empty or not a mapping give one-line ConfigErrors."""

import re

import pytest

from fedhl_jax.config import ConfigError, load_config


def write(tmp_path, text, name="run.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


def test_valid_file_and_overrides(tmp_path):
    cfg = load_config(write(tmp_path, "fed:\n  rounds: 3\noptim: {lr: 1e-3}\n"), ["fed.num_clients=4"])
    assert (cfg.fed.rounds, cfg.optim.lr, cfg.fed.num_clients) == (3, 1e-3, 4)


@pytest.mark.parametrize("text, line, column, problem", [
    ("fed:\n  rounds: 3\n   bad: 1\n", 3, 7, "mapping values are not allowed here"),
    ("fed: {rounds: 3\n", 2, 1, "expected ',' or '}'"),
    ("seed: 1\nfed:\n  algorithm: 'fedhl\n", 4, 1, "found unexpected end of stream"),
    ("fed:\n\trounds: 3\n", 2, 1, "found character '\\t' that cannot start any token"),
    ("seed: 1\nseed: 2\n", 2, 1, "found duplicate key seed"),
])
def test_malformed_yaml_names_file_and_line(tmp_path, text, line, column, problem):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = one_line(e)
    assert msg.startswith(f"{path}, line {line}, column {column}: invalid YAML: "), msg
    assert problem in msg


def test_unclosed_quote_names_where_it_started(tmp_path):
    path = write(tmp_path, "seed: 1\nfed:\n  algorithm: 'fedhl\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert "while scanning a quoted scalar started at line 3, column 14" in one_line(e)


@pytest.mark.parametrize("text", ["", "\n\n", "# nothing set yet\n", "---\n", "null\n"])
def test_empty_file(tmp_path, text):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert one_line(e).startswith(f"config file {path} is empty")


@pytest.mark.parametrize("text, got", [("- fed\n- optim\n", "got a list at line 1"),
                                       ("42\n", "got the value '42'"),
                                       ("just a sentence\n", "got the value 'just a sentence'")])
def test_top_level_not_a_mapping(tmp_path, text, got):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = one_line(e)
    assert str(path) in msg and "the top level must be a mapping" in msg and got in msg


def test_not_utf8(tmp_path):
    path = tmp_path / "bin.yaml"
    path.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(tmp_path / "absent.yaml")


CONFIGS = sorted(p for p in (__import__("pathlib").Path(__file__).parents[1] / "configs").glob("*.yaml")
                 if not p.name.startswith("results") and p.name != "synthetic.yaml")  # other schemas: results suites, bin/bias_experiment.py


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    assert cfg.fed.rounds >= 1 and cfg.eval.generate_examples <= cfg.data.eval_examples
    if path.name.startswith("smollm2_"):  # the real instruction model, chat-formatted
        assert cfg.model.name_or_path.endswith("smollm2-135m-instruct-gguf") and cfg.data.prompt_format == "auto"
        assert cfg.eval.zero_shot and cfg.eval.generate_every == 0


# ----------------------------------------------------------------- every field checked by type

import dataclasses  # noqa: E402
import math  # noqa: E402
import typing  # noqa: E402

from fedhl_jax import config as C  # noqa: E402
from fedhl_jax.algorithms import ALGORITHMS  # noqa: E402
from fedhl_jax.build import build_algorithm, options_class  # noqa: E402


def _leaf_keys(cls, prefix=""):
    """``(dotted key, type)`` of every non-dataclass field under ``cls``, from the dataclass fields."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _leaf_keys(tp, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", tp


def _has(tp, base) -> bool:
    return tp is base or base in typing.get_args(tp)


def _option_keys(base):
    """``(algorithm, option key)`` of every option of type ``base`` of every algorithm."""
    for name in sorted(ALGORITHMS):
        hints = typing.get_type_hints(options_class(name))
        yield from ((name, f"fed.options.{k}") for k, tp in hints.items() if _has(tp, base))


FLOAT_KEYS = [k for k, tp in _leaf_keys(C.TrainConfig) if _has(tp, float)]
BOOL_KEYS = [k for k, tp in _leaf_keys(C.TrainConfig) if _has(tp, bool)]


def test_the_schema_has_float_and_bool_fields():  # the parametrisations below are not empty
    assert {"optim.lr", "model.alpha", "fed.participation", "data.dirichlet_alpha"} <= set(FLOAT_KEYS)
    assert {"model.rslora", "eval.per_rank", "eval.zero_shot"} <= set(BOOL_KEYS)
    assert ("fedhl", "fed.options.eps") in list(_option_keys(float))
    assert ("fedhl", "fed.options.per_module") in list(_option_keys(bool))


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_non_finite_floats_are_refused_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)} must be a finite number, got (-?inf|nan)$"):
        load_config(None, [f"{key}={value}"])


@pytest.mark.parametrize("value", [".inf", ".nan"])
@pytest.mark.parametrize("algorithm, key", list(_option_keys(float)))
def test_non_finite_options_are_refused_naming_the_key(algorithm, key, value):
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)} must be a finite number"):
        load_config(None, [f"fed.algorithm={algorithm}", "fed.ranks=[4]", f"{key}={value}"])


@pytest.mark.parametrize("value, shown", [("3", "3"), ("0", "0"), ("yes_please", "'yes_please'"), ("1.0", "1.0")])
@pytest.mark.parametrize("key", BOOL_KEYS)
def test_non_booleans_are_refused_naming_the_key(key, value, shown):
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)} must be true or false, got {re.escape(shown)}$"):
        load_config(None, [f"{key}={value}"])


@pytest.mark.parametrize("algorithm, key", list(_option_keys(bool)))
def test_non_boolean_options_are_refused_naming_the_key(algorithm, key):
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)} must be true or false, got 3$"):
        load_config(None, [f"fed.algorithm={algorithm}", "fed.ranks=[4]", f"{key}=3"])
    cfg = load_config(None, [f"fed.algorithm={algorithm}", "fed.ranks=[4]", f"{key}=true"])
    assert cfg.fed.options[key.rsplit(".", 1)[1]] is True


def test_direct_construction_checks_types_too():
    with pytest.raises(ConfigError, match=r"^optim\.lr must be a finite number, got inf$"):
        C.OptimConfig(lr=math.inf)
    with pytest.raises(ConfigError, match=r"^model\.rslora must be true or false, got 3$"):
        C.ModelConfig(rslora=3)
    with pytest.raises(ConfigError, match=r"^fed\.num_clients must be an integer, got True$"):
        C.FedConfig(num_clients=True)


def test_finite_values_still_pass():
    cfg = load_config(None, ["optim.lr=1e-2", "model.alpha=8", "fed.options.eps=0.25", "model.rslora=true"])
    assert (cfg.optim.lr, cfg.model.alpha, cfg.fed.options["eps"], cfg.model.rslora) == (1e-2, 8.0, 0.25, True)
    assert isinstance(cfg.model.alpha, float)


# ----------------------------------------------------------------- config as a leaf


def test_config_holds_plain_values_and_builds_nothing():
    assert not hasattr(C.FedConfig, "build_algorithm")
    fed = C.FedConfig(options={"eps": 0.5})
    assert fed.options == {"eps": 0.5}  # construction keeps what it is given
    parsed = load_config(None, ["fed.options.eps=0.5"]).fed
    full = dataclasses.asdict(options_class("fedhl")())
    assert parsed.options == dict(full, eps=0.5)  # parsing fills every option, as plain values
    assert all(isinstance(v, (str, int, float, bool)) for v in parsed.options.values())
    with pytest.raises(dataclasses.FrozenInstanceError):
        parsed.options = {}  # type: ignore[misc]
    alg = build_algorithm(parsed)
    assert alg.options.eps == 0.5 and alg.name == "fedhl"
    assert all(not callable(getattr(parsed, f.name)) for f in dataclasses.fields(parsed))  # no algorithm inside


def test_parsed_config_round_trips_through_a_dict():
    cfg = load_config(None, ["fed.algorithm=flexlora", "fed.options.split=left", "data.label_kind=answer_size"])
    assert C.from_dict(C.TrainConfig, C.to_dict(cfg)) == cfg
    assert cfg.fed.options == {"split": "left", "svd_method": "exact"}


@pytest.mark.parametrize("override, msg", [
    ("fed.options.bogus=1", "fed.options.bogus is not an option of fed.algorithm='fedhl'; its options: split, "),
    ("fed.options.eps=-1", "fed.options: algorithm 'fedhl': eps must be > 0"),
    ("fed.algorithm=hetlora", None),
    ("fed.algorithm=fedit", "fed.algorithm='fedit' needs homogeneous ranks; got fed.ranks=[2, 4, 8, 16]"),
    ("data.label_kind=language", "data.label_kind must be one of ['steps', 'answer_size'] for data.dataset='gsm8k'"),
    ("data.partition=quantity", "data.partition 'quantity' is now called 'quantity_skew'"),
    ("data.dataset=mmlu", "data.dataset must be one of gsm8k, codealpaca, dolly; got 'mmlu'"),
])
def test_options_and_data_checked_at_load(override, msg):
    if msg is None:
        assert load_config(None, [override]).fed.options == {}
        return
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert one_line(e).startswith(msg), str(e.value)


def test_one_schema():
    from fedhl_jax import data
    from fedhl_jax.data import federated

    assert data.DataConfig is federated.DataConfig is C.DataConfig
    assert typing.get_type_hints(C.TrainConfig)["data"] is C.DataConfig


def test_defaults_are_parsed_too():
    """A config without a ``fed`` section still gets the algorithm's full options."""
    for cfg in (load_config(), C.from_dict(C.TrainConfig, {}), C.from_dict(C.TrainConfig, {"fed": None})):
        assert cfg.fed.options == dataclasses.asdict(options_class("fedhl")())
