"""Chat-template formatting of instruction data (fedhl_jax.data.prompts, ``data.prompt_format``) and
generation that compiles once per run (fedhl_jax.evaluator)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from fedhl_jax import model as M
from fedhl_jax.algorithms import make_algorithm
from fedhl_jax.config import ConfigError, EvalConfig, TrainConfig, from_dict
from fedhl_jax.data import build_prompt, tokenize_dataset, word_level_tokenizer
from fedhl_jax.data.federated import DataConfig, build_federated_dataset
from fedhl_jax.data.loading import DataError
from fedhl_jax.data.prompts import chat_messages, resolve_prompt_format
from fedhl_jax.evaluator import GlobalEvaluator
from fedhl_jax.model.generate import _generate_padded
from tests.gguf_helpers import CFG, write_tiny_gguf

RECORDS = [
    {"instruction": "hello world", "input": "", "output": "the world 12"},
    {"instruction": "Add:", "input": "1 2", "output": "hello"},
    {"instruction": "say", "input": "   ", "output": "or"},
]


@pytest.fixture(scope="module")
def chat_tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_tiny_gguf(path)
    return M.load_tokenizer(path)


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_auto_follows_the_model(chat_tok):
    words = word_level_tokenizer([build_prompt(r["instruction"], r["input"]) + r["output"] for r in RECORDS])
    assert resolve_prompt_format("auto", chat_tok) == "chat"
    assert resolve_prompt_format("auto", words) == "alpaca"
    assert resolve_prompt_format("alpaca", chat_tok) == "alpaca"
    with pytest.raises(ValueError, match="prompt_format=chat.*no chat template"):
        resolve_prompt_format("chat", words)
    with pytest.raises(ValueError, match="'jinja'"):
        resolve_prompt_format("jinja", chat_tok)


def test_user_turn_holds_instruction_then_input():
    assert chat_messages("Add:", "1 2")[0]["content"] == "Add:\n\n1 2"
    assert chat_messages("say", "   ") == [{"role": "user", "content": "say"}]
    assert chat_messages("say", "", "x")[1] == {"role": "assistant", "content": "x"}


def test_chat_tokens_and_loss_on_the_assistant_turn_only(chat_tok):
    data = tokenize_dataset(RECORDS, chat_tok, 64, prompt_format="auto")
    eos = chat_tok.eos_token_id
    assert chat_tok.convert_ids_to_tokens(eos) == "<|im_end|>"
    assert data.bos_id is None  # the template writes its own start tokens
    for i, r in enumerate(RECORDS):
        messages = chat_messages(r["instruction"], r["input"])
        prompt = M.apply_chat_template(chat_tok, messages, add_generation_prompt=True)
        full = M.apply_chat_template(chat_tok, chat_messages(r["instruction"], r["input"], r["output"]),
                                     add_generation_prompt=False)
        assert full.startswith(prompt) and full.endswith("<|im_end|>\n")
        want = _ids(chat_tok, full[: -len("\n")])  # the template's trailing newline is not a target
        n = data.lengths[i]
        assert data.tokens[i, :n].tolist() == want
        assert data.prompt_ids[i].tolist() == _ids(chat_tok, prompt)
        target = data.tokens[i][data.loss_mask[i] > 0]
        assert chat_tok.decode(target.tolist()) == r["output"] + "<|im_end|>"
        k = len(data.prompt_ids[i])
        assert data.loss_mask[i, :k].sum() == 0 and data.loss_mask[i, n:].sum() == 0
        assert data.tokens[i, n - 1] == eos


def test_alpaca_stays_for_base_models_and_on_request(chat_tok):
    data = tokenize_dataset(RECORDS, chat_tok, 256, prompt_format="alpaca")
    assert data.bos_id == chat_tok.bos_token_id and data.tokens[0, 0] == chat_tok.bos_token_id
    assert chat_tok.decode(data.prompt_ids[0][1:].tolist()) == build_prompt("hello world")


def test_chat_truncation_cuts_the_response(chat_tok):
    full = tokenize_dataset(RECORDS[:1], chat_tok, 64, prompt_format="chat")
    k = len(full.prompt_ids[0])
    cut = tokenize_dataset(RECORDS[:1], chat_tok, k + 2, prompt_format="chat")
    assert cut.n_truncated == 1 and cut.loss_mask[0].sum() == 2
    assert cut.tokens[0].tolist() == full.tokens[0, : k + 2].tolist()


def test_chat_without_template_is_a_data_error():
    words = word_level_tokenizer(["a b c"])
    with pytest.raises(DataError, match="data.prompt_format=chat"):
        build_federated_dataset(DataConfig(prompt_format="chat", eval_examples=4, max_train_examples=20), words,
                                num_clients=2, records=(_dataset(RECORDS * 4), None))


def test_config_errors_name_the_values():
    with pytest.raises(ConfigError, match="data.prompt_format must be one of"):
        from_dict(TrainConfig, {"data": {"prompt_format": "chatml"}})
    with pytest.raises(ConfigError, match="eval.generate_examples=300 is more than the data.eval_examples=200"):
        from_dict(TrainConfig, {"data": {"eval_examples": 200}, "eval": {"generate_examples": 300}})
    with pytest.raises(ConfigError, match="eval.generate_every must be >= 0"):
        EvalConfig(generate_every=-1)


def _dataset(rows):
    import datasets

    return datasets.Dataset.from_list(rows)


def test_generation_compiles_once_per_run(chat_tok):
    """Batches of several prompt lengths and a short last batch reuse one compiled decode program."""
    rows = [{"instruction": "hello " * (1 + i % 5) + "world", "input": "", "output": "12"} for i in range(7)]
    data = tokenize_dataset(rows, chat_tok, 64, prompt_format="chat")
    assert len(set(data.prompt_lengths.tolist())) == 5
    cfg = CFG.replace(num_layers=1)
    params = M.init_params(cfg, jax.random.PRNGKey(0))
    shapes = M.lora_targets(cfg, ["q_proj", "v_proj"])
    alg = make_algorithm("fedhl", 4)
    state = alg.init(shapes, jax.random.PRNGKey(0))
    ev = GlobalEvaluator(cfg, params, chat_tok, data, alg, [2, 4],
                         EvalConfig(batch_size=3, generate_examples=7, max_new_tokens=3, loss_examples=5),
                         "rouge_l", alpha=8.0, rslora=False, r_max=4)
    assert ev.loss_tokens.shape[0] == 5 and ev.prompt_width == 32
    before = _generate_padded._cache_size()
    first = ev(state, jax.random.PRNGKey(1))
    assert first["eval_generated"] == 7 and 0.0 <= first["eval_rouge_l"] <= 1.0
    per = first["eval_rouge_l_examples"]  # per-answer scores, whose mean is the reported score
    assert len(per) == 7 and all(0.0 <= x <= 1.0 for x in per)
    np.testing.assert_allclose(np.mean(per), first["eval_rouge_l"], atol=1e-6)
    again = ev(state, jax.random.PRNGKey(1))
    assert _generate_padded._cache_size() == before + 1  # 3 batches x 2 calls, one program
    assert again["eval_rouge_l"] == first["eval_rouge_l"]
    assert "eval_rouge_l" not in ev(state, jax.random.PRNGKey(1), generate=False)
    # the padded batches give each prompt the answer it gets alone
    alone = M.strip_after_eos(M.generate(cfg, params, [data.prompt_ids[6].tolist()], max_new_tokens=3,
                                         eos_id=chat_tok.eos_token_id), chat_tok.eos_token_id)[0]
    texts = []
    ev.cfg = EvalConfig(batch_size=3, generate_examples=7, max_new_tokens=3)
    from fedhl_jax import metrics as evaluation

    orig = evaluation.generation_eval

    def spy(gen, prompts, refs, metric, batch_size):
        res = orig(gen, prompts, refs, metric, batch_size=batch_size)
        texts.extend(res["predictions"])
        return res

    evaluation.generation_eval = spy
    try:
        ev.generation(alg.global_delta(state))
    finally:
        evaluation.generation_eval = orig
    assert texts[6] == chat_tok.decode(alone, skip_special_tokens=True)


def test_truncation_is_reported_once(chat_tok, caplog):
    """The run's log gets one truncation line per split, and no duplicate logging warning."""
    rows = [{"instruction": "hello " * 8, "input": "", "output": "world " * 12} for _ in range(8)]
    lines = []
    with caplog.at_level("WARNING"):
        build_federated_dataset(DataConfig(dataset="gsm8k", seq_len=44, eval_examples=4), chat_tok, num_clients=2,
                                records=(_dataset(rows), _dataset(rows[:4])), log=lines.append)
    assert "truncation" not in caplog.text
    train = [x for x in lines if x.startswith("train: ")]
    held = [x for x in lines if x.startswith("held-out: ")]
    assert len(train) == len(held) == 1 and "8 truncated" in train[0] and "4 truncated" in held[0]
