"""Model and data files as untrusted input: hostile GGUF metadata and tensors, non-finite weights,
chat templates that try to escape or exhaust the sandbox, and non-UTF-8 JSON Lines.

Every hostile file is made here from the small generated model of ``tests/gguf_helpers.py``
(or the tiny safetensors fixture); each refusal is asserted by type and message, and through
the CLI by exit status 2, a one-line ``error:`` and no run directory left behind.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import datasets
import gguf
import numpy as np
import pytest
import transformers  # its import-time notice goes to stderr here, not into a captured CLI run
from safetensors.numpy import load_file, save_file

from fedhl_jax.data.loading import DataError, DataSource, load_instruction_dataset, validate_json_file
from fedhl_jax.model import gguf as G
from fedhl_jax.model import gguf_tokenizer as GT
from fedhl_jax.model import load_pretrained
from fedhl_jax.model.checkpoint import NonFiniteWeightError, check_finite_weight
from tests.conftest import REPO, tiny_overrides
from tests.gguf_helpers import CHAT_TEMPLATE, write_tiny_gguf

TINY_HF = REPO / "tests" / "fixtures" / "tiny_llama"
MESSAGES = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]


def hostile(tmp_path: Path, name: str = "hostile.gguf", **meta) -> Path:
    """The tiny model with metadata keys overridden (``llama__block_count`` → ``llama.block_count``)."""
    path = tmp_path / name
    write_tiny_gguf(path, meta={k.replace("__", "."): v for k, v in meta.items()})
    return path


def tensor_data_offset(path: Path, name: str) -> tuple[int, int]:
    """``(byte offset, byte size)`` of a tensor's data in a GGUF file."""
    t = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == name)
    return t.data_offset, t.n_bytes


def patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


# --------------------------------------------------------------------------- GGUF metadata
@pytest.mark.parametrize("meta,message", [
    ({"llama.block_count": 100_000_000},
     r"llama\.block_count=100000000 but the file holds the tensors of 2 block\(s\) \(blk\.0 \.\. blk\.1\)"),
    ({"llama.block_count": 3}, r"llama\.block_count=3 but the file holds the tensors of 2 block"),
    ({"llama.block_count": 1}, r"llama\.block_count=1 but the file holds the tensors of 2 block"),
    ({"llama.block_count": 0}, r"llama\.block_count=0 must be a positive integer"),
    ({"llama.attention.head_count": 0}, r"llama\.attention\.head_count=0 must be a positive integer"),
    ({"llama.attention.head_count": -4}, r"llama\.attention\.head_count=-4 must be a positive integer"),
    ({"llama.attention.head_count": "4"}, r"llama\.attention\.head_count='4' must be a positive integer"),
    ({"llama.attention.head_count": 3},
     r"llama\.attention\.head_count=3 does not divide llama\.embedding_length=64"),
    ({"llama.attention.head_count_kv": 3},
     r"llama\.attention\.head_count_kv=3 does not divide llama\.attention\.head_count=4"),
    ({"llama.attention.head_count_kv": 0}, r"llama\.attention\.head_count_kv=0 must be a positive integer"),
    ({"llama.embedding_length": 0}, r"llama\.embedding_length=0 must be a positive integer"),
    ({"llama.feed_forward_length": -1}, r"llama\.feed_forward_length=-1 must be a positive integer"),
    ({"llama.context_length": 0}, r"llama\.context_length=0 must be a positive integer"),
    ({"llama.vocab_size": 0}, r"llama\.vocab_size=0 must be a positive integer"),
    ({"llama.expert_count": -1}, r"llama\.expert_count=-1 must be a non-negative integer"),
    ({"llama.rope.freq_base": float("nan")}, r"llama\.rope\.freq_base=nan must be a finite positive number"),
    ({"llama.rope.freq_base": float("inf")}, r"llama\.rope\.freq_base=inf must be a finite positive number"),
    ({"llama.attention.layer_norm_rms_epsilon": -1e-5},
     r"llama\.attention\.layer_norm_rms_epsilon=-1e-05 must be a finite positive number"),
], ids=lambda v: str(v)[:48] if isinstance(v, dict) else None)
def test_inconsistent_metadata_is_refused_naming_key_and_value(tmp_path, meta, message):
    path = hostile(tmp_path, **{k.replace(".", "__"): v for k, v in meta.items()})
    with pytest.raises(G.GGUFError, match=message) as e:
        G.load_gguf(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(G.GGUFError, match=message):
        G.gguf_config(path)


@pytest.mark.parametrize("meta,message", [
    ({"llama.embedding_length": 10**9}, r"llama\.rope\.dimension_count=16, head_dim=250000000"),
    ({"llama.embedding_length": 128, "llama.rope.dimension_count": 32},
     r"shape mismatch for 'token_embd\.weight'.*file has \(272, 64\), metadata implies \(272, 128\)"),
    ({"llama.feed_forward_length": 97}, r"shape mismatch for 'blk\.0\.ffn_gate\.weight'.*\(96, 64\).*\(97, 64\)"),
    ({"llama.vocab_size": 10**9}, r"shape mismatch for 'token_embd\.weight'"),
    ({"llama.attention.head_count_kv": 4}, r"shape mismatch for 'blk\.0\.attn_k\.weight'.*\(32, 64\).*\(64, 64\)"),
    ({"general.architecture": 5}, r"general\.architecture=5 is not a name"),
    ({"general.architecture": "gptneox"}, r"hostile\.gguf: unsupported GGUF architecture 'gptneox'"),
], ids=lambda v: str(v)[:48] if isinstance(v, dict) else None)
def test_metadata_that_disagrees_with_the_tensors_is_refused_before_decoding(tmp_path, monkeypatch, meta,
                                                                            message):
    path = hostile(tmp_path, **{k.replace(".", "__"): v for k, v in meta.items()})
    decoded = []
    monkeypatch.setattr(G, "dequantize", lambda *a, **k: decoded.append(a) or 1 / 0)
    with pytest.raises(G.GGUFError, match=message):
        G.load_gguf(path)
    assert decoded == []  # nothing was decoded before the refusal


def test_a_valid_file_passes_the_checks(tmp_path):
    path = hostile(tmp_path)  # no override: the neighbour of every case above
    reader = G.open_gguf(path)
    G.check_gguf_metadata(G.read_metadata(reader), [t.name for t in reader.tensors], path)
    cfg = G.gguf_config(path)
    assert len(G.check_gguf_tensors(reader, cfg, path)) == len(reader.tensors)
    # one tensor of a block missing: the block count still agrees, the tensor check names it
    names = [t.name for t in reader.tensors if t.name != "blk.1.ffn_up.weight"]
    G.check_gguf_metadata(G.read_metadata(reader), names, path)
    partial = SimpleNamespace(tensors=[t for t in reader.tensors if t.name in names])
    with pytest.raises(G.GGUFError, match=r"missing tensor\(s\) in .*hostile\.gguf: \['blk\.1\.ffn_up\.weight'\]"):
        G.check_gguf_tensors(partial, cfg, path)


def hf_folder(tmp_path: Path, **config) -> Path:
    """A copy of the tiny safetensors checkpoint with ``config.json`` keys overridden."""
    folder = tmp_path / "ckpt"
    shutil.copytree(TINY_HF, folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, **config}))
    return folder


@pytest.mark.parametrize("kind", ["gguf", "safetensors"])
def test_a_hundred_million_layers_are_refused_at_once_in_little_memory(tmp_path, kind):
    if kind == "gguf":
        path, claim = hostile(tmp_path, llama__block_count=100_000_000), "llama.block_count=100000000"
    else:
        path, claim = hf_folder(tmp_path, num_hidden_layers=100_000_000), "num_hidden_layers=100000000"
    script = textwrap.dedent(f"""
        import json, resource, time
        from fedhl_jax.model import gguf as G
        from fedhl_jax.model import load_pretrained
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        try:
            load_pretrained({str(path)!r})
            error = None
        except ValueError as e:
            error = str(e)
        seconds = time.perf_counter() - t0
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        print(json.dumps({{"error": error, "seconds": seconds, "grown_kib": grown}}))
    """)
    res = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={"JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["error"] is not None and claim in out["error"] and str(path) in out["error"]
    assert out["seconds"] < 1.0, out
    assert out["grown_kib"] < 200 * 1024, out  # peak resident memory grew by under 200 MB


def test_tensor_data_outside_the_file_is_refused(tmp_path):
    path = hostile(tmp_path)
    reader = gguf.GGUFReader(str(path))
    t = next(t for t in reader.tensors if t.name == "output_norm.weight")
    offset_field = t.field.parts[-1]  # the tensor's data offset, relative to the data section
    position = t.field.offset + sum(int(p.nbytes) for p in t.field.parts[:-1])
    assert int(offset_field[0]) == t.data_offset - reader.data_offset
    del reader
    patch(path, position, np.uint64(path.stat().st_size).tobytes())
    with pytest.raises(G.GGUFError, match=rf"cannot read GGUF file {path}"):
        G.load_gguf(path)
    cut = hostile(tmp_path, "cut.gguf")
    cut.write_bytes(cut.read_bytes()[:-100])  # the last tensor ends past the end of the file
    with pytest.raises(G.GGUFError, match="cannot read GGUF file .*cut.gguf"):
        G.load_gguf(cut)


@pytest.mark.parametrize("layers", [3, 1000])
def test_a_config_json_claiming_more_layers_than_the_files_hold_is_refused(tmp_path, layers):
    folder = hf_folder(tmp_path, num_hidden_layers=layers)
    with pytest.raises(ValueError, match=rf"{folder}/config\.json: num_hidden_layers={layers} but the safetensors "
                                         rf"files hold the tensors of 2 layer\(s\) \(model\.layers\.0 \.\. 1\)"):
        load_pretrained(folder)
    fewer = hf_folder(tmp_path / "fewer", num_hidden_layers=1)  # the other side: the extra layer's key is named
    with pytest.raises(ValueError, match=r"unexpected key 'model\.layers\.1\."):
        load_pretrained(fewer)


@pytest.mark.parametrize("meta,message", [
    ({"tokenizer.ggml.merges": ["Ġ t", "hello"]}, r"tokenizer\.ggml\.merges\[1\]='hello' is not two tokens"),
    ({"tokenizer.ggml.merges": ["a b c"]}, r"tokenizer\.ggml\.merges\[0\]='a b c' is not two tokens"),
    ({"tokenizer.ggml.merges": ["zz qq"]}, r"do not form a BPE vocabulary: .*zz"),
    ({"tokenizer.ggml.model": "llama"}, r"unsupported GGUF tokenizer model 'llama'"),
    ({"tokenizer.ggml.pre": "nonsense"}, r"unsupported GGUF pre-tokenizer 'nonsense'"),
    ({"tokenizer.ggml.tokens": None}, r"has no tokenizer"),
], ids=["merge-one", "merge-three", "merge-unknown", "model", "pre", "no-tokens"])
def test_hostile_tokenizer_metadata_is_refused_naming_key_and_file(tmp_path, meta, message):
    from fedhl_jax.model import load_tokenizer

    path = hostile(tmp_path, **{k.replace(".", "__"): v for k, v in meta.items()})
    with pytest.raises(G.GGUFError, match=message) as e:
        load_tokenizer(path)
    assert str(e.value).startswith(f"{path}: ") and "\n" not in str(e.value)


def test_metadata_strings_that_are_not_utf8_are_refused_naming_the_key(tmp_path):
    path = hostile(tmp_path)
    data = path.read_bytes()
    patch(path, data.index(CHAT_TEMPLATE.encode()) + 3, b"\xff")
    with pytest.raises(G.GGUFError, match=rf"{path}: GGUF metadata 'tokenizer\.chat_template' cannot be read: "
                                          r"'utf-8' codec can't decode byte 0xff"):
        G.load_gguf(path)


def test_random_header_damage_gives_only_clear_errors(tmp_path):
    """60 seeded damages of 1-4 header bytes: each load ends in a ValueError (or loads), never another
    exception, a hang or a large allocation."""
    import random
    import resource

    from fedhl_jax.model import load_tokenizer

    path = hostile(tmp_path)
    base = path.read_bytes()
    header = G.open_gguf(path).tensors[0].data_offset
    rng, outcomes = random.Random(0), set()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(60):
        damaged = bytearray(base)
        for _ in range(rng.randint(1, 4)):
            damaged[rng.randrange(header)] = rng.randrange(256)
        path.write_bytes(bytes(damaged))
        for load in (G.load_gguf, load_tokenizer):
            t0 = time.perf_counter()
            try:
                load(path)
                outcomes.add("loaded")
            except ValueError as e:
                assert "\n" not in str(e) and str(path) in str(e), e
                outcomes.add(type(e).__name__)
            assert time.perf_counter() - t0 < 5
    assert "GGUFError" in outcomes
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 200 * 1024


# --------------------------------------------------------------------------- non-finite weights
@pytest.mark.parametrize("name,data", [
    ("blk.0.ffn_up.weight", b"\xff" * 64),  # F32: NaN
    ("token_embd.weight", b"\xff" * 64),  # Q8_0: a NaN scale
    ("blk.0.attn_k.weight", b"\x00\x7c" * 4),  # F16: +Inf
    ("blk.1.ffn_down.weight", b"\x80\xff" * 4),  # BF16: -Inf
    ("output_norm.weight", np.array([np.inf], np.float32).tobytes()),  # F32: +Inf
])
def test_non_finite_gguf_weights_are_refused_naming_tensor_and_file(tmp_path, name, data):
    path = hostile(tmp_path)
    offset, size = tensor_data_offset(path, name)
    patch(path, offset + size // 2, data)
    with pytest.raises(NonFiniteWeightError, match=rf"tensor '{name}' in {path} holds \d+ non-finite"):
        load_pretrained(path)


def test_large_finite_weights_are_kept():
    w = np.array([np.finfo(np.float32).max, -np.finfo(np.float32).max, 0.0], np.float32)
    check_finite_weight(w, "w", "f")  # sums would overflow; min and max do not
    check_finite_weight(np.zeros((0, 4), np.float32), "w", "f")
    w[1] = np.nan
    with pytest.raises(NonFiniteWeightError, match=r"tensor 'w' in f holds 1 non-finite value\(s\)"):
        check_finite_weight(w, "w", "f")


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_safetensors_weights_are_refused_naming_tensor_and_file(tmp_path, value):
    folder = tmp_path / "ckpt"
    shutil.copytree(TINY_HF, folder)
    tensors = load_file(folder / "model.safetensors")
    key = "model.layers.1.mlp.down_proj.weight"
    tensors[key][3, 5] = value
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(NonFiniteWeightError, match=rf"tensor '{key}' in {folder}/model\.safetensors holds 1 "):
        load_pretrained(folder)
    with pytest.raises(NonFiniteWeightError, match=rf"'{key}'"):
        load_pretrained(folder, dtype="bfloat16")


# --------------------------------------------------------------------------- chat templates
@pytest.mark.parametrize("template,message", [
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", r"refused by the sandbox: access to attribute '__class__'"),
    ("{{ messages.__class__.__name__ }}", r"refused by the sandbox"),
    ("{% include '/etc/passwd' %}", r"includes or imports '/etc/passwd', and templates may load no other file"),
    ("{% import '/etc/passwd' as p %}", r"includes or imports '/etc/passwd'"),
    ("{% extends 'base.html' %}", r"includes or imports 'base\.html'"),
    ("{{ 'a' * 1000000000 }}", r"builds a value beyond the bound \(4194304\) with '\*'"),
    ("{{ [1] * 1000000000 }}", r"with '\*'"),
    ("{{ 10 ** 100000000 }}", r"with '\*\*'"),
    ("{{ '%999999999s' % 'a' }}", r"with '%'"),
    ("{{ 'a' | center(1000000000) }}", r"passes 1000000000 to a call"),
    ("{{ 'a'.ljust(1000000000) }}", r"passes 1000000000 to a call"),
    ("{{ '{:>999999999}'.format(1) }}", r"uses a format width beyond the bound: '\{:>999999999\}'"),
    ("{{ 'x{0:{1}}'.format_map({}) }}", r"failed: IndexError"),
    ("{{ '{0:>{1}}'.format('a', 999999999) }}", r"passes 999999999 to a call"),
    ("{{ '%-999999999s' | format('a') }}", r"uses a format width beyond the bound: '%-999999999'"),
    ("{{ '%*s' % (999999999, 'a') }}", r"with '%'"),
    ("{% macro d(s, n) %}{{ d(s ~ s, n - 1) if n else s | length }}{% endmacro %}{{ d('ab', 40) }}",
     r"builds a string of \d+ characters"),
    ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", r"recurses too deeply"),
    ("{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}", r"writes more than 4194304 characters"),
    ("{{ raise_exception('no system role') }}", r"failed: TemplateError: no system role"),
    ("{% for %}", r"\(line 1\) failed: TemplateSyntaxError"),
    ("ok\n{{ 1 // 0 }}", r"\(line 2\) failed: ZeroDivisionError"),
])
def test_template_refusals_are_one_line_naming_the_source(template, message):
    with pytest.raises(GT.ChatTemplateError, match=message) as e:
        GT.render_chat_template(template, MESSAGES, source="/models/m.gguf")
    assert str(e.value).startswith("the chat template of /models/m.gguf")
    assert "\n" not in str(e.value) and isinstance(e.value, ValueError)


@pytest.mark.parametrize("loops", [
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{% for i in range(100000) %}{% for j in range(100000) %}{{ '' }}{% endfor %}{% endfor %}",
    "{% for i in range(100000) recursive %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{% macro m() %}{% for j in range(100000) %}{% endfor %}{% endmacro %}"
    "{% for i in range(100000) %}{{ m() }}{% endfor %}",
    "{% for i in range(100000) %}{% for j in 'x' * 100000 %}{% endfor %}{% endfor %}",
])
def test_nested_loops_are_refused_quickly(loops):
    t0 = time.perf_counter()
    with pytest.raises(GT.ChatTemplateError, match=r"takes more than 1000000 loop iterations and calls"):
        GT.render_chat_template(loops, MESSAGES)
    assert time.perf_counter() - t0 < 2.0


def test_time_bound(monkeypatch):
    monkeypatch.setattr(GT, "MAX_TEMPLATE_SECONDS", 0.0)
    with pytest.raises(GT.ChatTemplateError, match=r"runs longer than 0 s"):
        GT.render_chat_template("{% for i in range(5000) %}{% endfor %}", MESSAGES)
    assert GT.render_chat_template("{% for i in range(1000) %}{% endfor %}x", MESSAGES) == "x"  # < 1024 steps


def test_templates_within_the_bounds_render_as_before():
    assert GT.render_chat_template(CHAT_TEMPLATE, MESSAGES[:1], add_generation_prompt=True) == (
        "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n")
    ok = ("{% for i in range(999) %}{% endfor %}{{ ('ab' * 1000) | length }} {{ 'a' ~ 'b' }} "
          "{{ '%5s' % 'x' }} {{ 'x' | center(9) }} {{ '{:>3}'.format(1) }} {{ 2 ** 10 }}")
    assert GT.render_chat_template(ok, []) == "2000 ab     x     x       1 1024"
    assert len(GT.render_chat_template("{{ 'x' * 4194304 }}", [])) == GT.MAX_TEMPLATE_CHARS
    # data that looks like a wide format is only data: filters, methods and concatenation pass it on
    text = "total: 12345678 {x: 99999999} at 50% %99999999s"
    show = ("{% for m in messages %}{{ m['content'] | trim | replace('a', 'a') }}|"
            "{{ m['content'].strip() ~ '|' + m['content'] }}{% endfor %}")
    assert GT.render_chat_template(show, [{"role": "user", "content": text}]) == f"{text}|{text}|{text}"
    # the budget is per rendering: many renderings of a small template all pass
    for _ in range(2):  # 600 000 steps each, 1 200 000 in all
        GT.render_chat_template("{% for i in range(60000) %}{% for j in range(9) %}{% endfor %}{% endfor %}",
                                [])


LLAMA3_LIKE = (
    "{{ bos_token }}{% set ns = namespace(system='') %}{% if messages[0]['role'] == 'system' %}"
    "{% set ns.system = messages[0]['content'] | trim %}{% set messages = messages[1:] %}{% endif %}"
    "{% macro header(role) %}<|start|>{{ role }}<|end|>\n\n{% endmacro %}"
    "{% if ns.system %}{{ header('system') ~ ns.system }}<|eot|>{% endif %}"
    "{% for m in messages if m['role'] != 'tool' %}{{ header(m['role']) + m['content'] | trim }}"
    "{{ '<|eot|>' if not loop.last else '<|eot|>\n' }}{{ loop.index0 }}/{{ loop.length }}"
    "{% if loop.first %}*{% endif %}{% endfor %}{% for m in messages | reverse %}{{ m.role[0] }}{% else %}none"
    "{% endfor %}{% if add_generation_prompt %}{{ header('assistant') }}{% endif %}")


@pytest.mark.parametrize("template", [CHAT_TEMPLATE, LLAMA3_LIKE])
def test_bounded_rendering_matches_jinjas_sandbox(template):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    plain = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(template)
    conversation = [{"role": "system", "content": " be brief "}, *MESSAGES,
                    {"role": "tool", "content": "x"}, {"role": "user", "content": "again"}]
    for messages in (conversation, MESSAGES[:1]):
        for gen in (True, False):
            want = plain.render(messages=messages, add_generation_prompt=gen, bos_token="<s>")
            got = GT.render_chat_template(template, messages, add_generation_prompt=gen, bos_token="<s>")
            assert got == want and len(got) > 20


# --------------------------------------------------------------------------- the CLI
def run_cli(tmp_path: Path, capsys, **overrides) -> tuple[int, str, Path]:
    from fedhl_jax.cli import main

    out = tmp_path / "run"
    datasets.disable_progress_bars()  # the loader's progress bars would share stderr with the error
    try:
        code = main(["--no-progress", "--out", str(out), *tiny_overrides(tmp_path, **overrides)])
    finally:
        datasets.enable_progress_bars()
    return code, capsys.readouterr().err, out


@pytest.mark.parametrize("meta,data,message", [
    ({"llama.block_count": 100_000_000}, None, r"llama\.block_count=100000000 but the file holds"),
    ({"llama.attention.head_count": 0}, None, r"llama\.attention\.head_count=0 must be a positive integer"),
    ({"tokenizer.chat_template": "{{ ''.__class__.__mro__ }}"}, None, r"chat template of .*refused by the sandbox"),
    ({"tokenizer.chat_template": "{% include '/etc/passwd' %}"}, None, r"includes or imports '/etc/passwd'"),
    ({"tokenizer.chat_template": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}"
                                 "{% endfor %}"}, None, r"takes more than 1000000 loop iterations"),
    ({}, ("blk.0.ffn_up.weight", b"\xff" * 64), r"tensor 'blk\.0\.ffn_up\.weight' in .* non-finite"),
], ids=["layers", "heads", "mro", "include", "loops", "nan"])
def test_cli_refuses_hostile_models_with_exit_2_and_one_line(tmp_path, capsys, meta, data, message):
    path = hostile(tmp_path, **{k.replace(".", "__"): v for k, v in meta.items()})
    if data is not None:
        offset, size = tensor_data_offset(path, data[0])
        patch(path, offset + size // 2, data[1])
    t0 = time.perf_counter()
    code, err, out = run_cli(tmp_path, capsys, **{"model.name_or_path": str(path)})
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert str(path) in lines[0]
    assert __import__("re").search(message, lines[0]), lines[0]
    assert not out.exists()  # nothing left behind, not even the lock
    assert time.perf_counter() - t0 < 60


# --------------------------------------------------------------------------- JSON Lines
def test_non_utf8_jsonl_names_file_and_line(tmp_path):
    good = '{"question": "q", "answer": "a"}\n'
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes((good * 2).encode() + '{"question": "caf\xe9", "answer": "a"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=rf"{bad}: line 3: not UTF-8 text \(byte 0xe9 at offset \d+\)"):
        validate_json_file(bad, ["question", "answer"])
    with pytest.raises(DataError, match=r"latin1\.jsonl: line 3: not UTF-8"):
        load_instruction_dataset(DataSource("gsm8k", path=str(bad)))
    first = tmp_path / "first.jsonl"
    first.write_bytes(b"\xff" + good.encode())
    with pytest.raises(DataError, match=r"first\.jsonl: line 1: not UTF-8 text \(byte 0xff at offset 0\)"):
        validate_json_file(first, ["question", "answer"])
    utf8 = tmp_path / "utf8.jsonl"  # the neighbour: the same row in UTF-8 is read
    utf8.write_bytes((good * 2).encode() + '{"question": "café", "answer": "a"}\n'.encode())
    assert validate_json_file(utf8, ["question", "answer"]) == 3


def test_cli_refuses_non_utf8_data_with_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    row = b'{"question": "1 + 1", "answer": "#### 2"}\n'
    bad.write_bytes(row * 3 + b'{"question": "\xe9", "answer": "x"}\n')
    code, err, out = run_cli(tmp_path, capsys, **{"data.source": str(bad)})
    assert code == 2
    offset = 3 * len(row) + len(b'{"question": "')
    assert err.strip().splitlines() == [f"error: {bad}: line 4: not UTF-8 text (byte 0xe9 at offset {offset})"]
    assert not out.exists()
