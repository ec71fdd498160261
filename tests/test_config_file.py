"""load_config: YAML files that are malformed, empty or not a mapping give one-line ConfigErrors."""

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
