"""Loading HF safetensors checkpoints: parity with PyTorch and error reporting."""

import json
import shutil
from functools import partial
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from fedhl_jax.model import (forward, hf_key_to_path, load_pretrained, load_tokenizer,
                             param_shapes, path_to_hf_key, resolve_checkpoint)

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "fixtures" / "tiny_llama"
GOLDEN = REPO / "tests" / "golden"
STORIES = REPO.parent / "shared" / "models" / "stories260K-hf"
needs_stories = pytest.mark.skipif(not STORIES.is_dir(), reason=f"{STORIES} not found")


@pytest.fixture(scope="module")
def tiny():
    return load_pretrained(TINY)


def test_tiny_config(tiny):
    cfg, params = tiny
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads) == (32, 48, 4, 2)
    assert not cfg.tie_word_embeddings and params["lm_head"].shape == (97, 32)


def test_tiny_logits_match_torch(tiny):
    cfg, params = tiny
    golden = np.load(GOLDEN / "tiny_llama_logits.npz")
    fwd = jax.jit(partial(forward, cfg))
    diff = np.abs(np.asarray(fwd(params, golden["tokens"])) - golden["logits"]).max()
    assert diff < 1e-4, diff
    # left-padded batch with attention mask (HF given the same position ids)
    out = np.asarray(fwd(params, golden["padded_tokens"], attention_mask=golden["padded_mask"]))
    real = golden["padded_mask"].astype(bool)
    diff = np.abs(out - golden["padded_logits"])[real].max()
    assert diff < 1e-4, diff
    explicit = fwd(params, golden["padded_tokens"], attention_mask=golden["padded_mask"],
                   positions=golden["padded_positions"])
    np.testing.assert_allclose(np.asarray(explicit)[real], out[real], atol=1e-6)


@pytest.mark.shared
@needs_stories
def test_stories260k_logits_match_torch():
    cfg, params = load_pretrained(STORIES)
    assert cfg.tie_word_embeddings and "lm_head" not in params
    golden = np.load(GOLDEN / "stories260K_logits.npz")
    diff = np.abs(np.asarray(jax.jit(partial(forward, cfg))(params, golden["tokens"]))
                  - golden["logits"]).max()
    assert diff < 1e-4, diff


@pytest.mark.shared
@needs_stories
def test_stories260k_tokenizer():
    tok = load_tokenizer(STORIES)
    assert tok("Once upon a time").input_ids == [1, 403, 407, 261, 378]
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)


def test_bfloat16_load(tiny):
    cfg16, p16 = load_pretrained(TINY, dtype="bfloat16")
    assert cfg16.dtype == "bfloat16" and p16["embed_tokens"].dtype == np.dtype("bfloat16")
    cfg, params = tiny
    np.testing.assert_allclose(np.asarray(p16["norm"], np.float32), np.asarray(params["norm"]),
                               rtol=1e-2)


def test_key_mapping_round_trip(tiny):
    cfg, _ = tiny
    for path in param_shapes(cfg):
        assert hf_key_to_path(path_to_hf_key(path)) == path
    assert hf_key_to_path("model.layers.12.mlp.up_proj.weight") == "layers.12.mlp.up_proj"
    assert hf_key_to_path("model.layers.0.self_attn.q_proj.bias") is None


# ------------------------------------------------------------------------- errors
def copy_tiny(tmp_path: Path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(TINY, dst)
    return dst


def rewrite(folder: Path, edit) -> None:
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def test_truncated_file_names_the_file(tmp_path):
    ckpt = copy_tiny(tmp_path)
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors.*truncated"):
        load_pretrained(ckpt)


def test_missing_key_is_named(tmp_path):
    ckpt = copy_tiny(tmp_path)
    rewrite(ckpt, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing key.*model\.layers\.1\.mlp\.up_proj\.weight"):
        load_pretrained(ckpt)


def test_unexpected_key_is_named(tmp_path):
    ckpt = copy_tiny(tmp_path)
    rewrite(ckpt, lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": np.zeros(32, np.float32)}))
    with pytest.raises(ValueError, match=r"unexpected key 'model\.layers\.0\.self_attn\.q_proj\.bias'"):
        load_pretrained(ckpt)
    ckpt2 = copy_tiny(tmp_path / "b")
    rewrite(ckpt2, lambda t: t.update({"model.layers.5.input_layernorm.weight": np.ones(32, np.float32)}))
    with pytest.raises(ValueError, match=r"model\.layers\.5\.input_layernorm\.weight"):
        load_pretrained(ckpt2)


def test_shape_mismatch_is_named(tmp_path):
    ckpt = copy_tiny(tmp_path)
    config = json.loads((ckpt / "config.json").read_text())
    config["intermediate_size"] = 40
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"down_proj\.weight.* has \(32, 48\), config expects \(32, 40\)"):
        load_pretrained(ckpt)


def test_unsupported_architecture_and_activation(tmp_path):
    ckpt = copy_tiny(tmp_path)
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "hidden_act": "gelu_new"}))
    with pytest.raises(ValueError, match="'gelu_new'"):
        load_pretrained(ckpt)
    (ckpt / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="'GPT2LMHeadModel'"):
        load_pretrained(ckpt)


def test_missing_files(tmp_path):
    ckpt = copy_tiny(tmp_path)
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_pretrained(ckpt)
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="model-00001-of-00002.safetensors"):
        load_pretrained(ckpt)
    (ckpt / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_pretrained(ckpt)
    with pytest.raises(FileNotFoundError, match="no_such_folder"):
        resolve_checkpoint(tmp_path / "no_such_folder")


def test_sharded_checkpoint(tmp_path, tiny):
    cfg, params = tiny
    ckpt = copy_tiny(tmp_path)
    tensors = load_file(ckpt / "model.safetensors")
    (ckpt / "model.safetensors").unlink()
    keys = sorted(tensors)
    weight_map = {}
    for i, part in enumerate((keys[::2], keys[1::2])):
        name = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: tensors[k] for k in part}, ckpt / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    _, sharded = load_pretrained(ckpt)
    for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ------------------------------------------------------------------------- pickles and resolution
class _Payload:
    """Unpickling this writes a marker file: proof that nothing was unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "unpickled"))


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "weights.pth", "last.ckpt"])
def test_pickle_only_folder_is_refused(tmp_path, name):
    import pickle

    from fedhl_jax.model.hub import resolve_model_source
    from fedhl_jax.model.checkpoint import UnsafeCheckpointError

    ckpt = copy_tiny(tmp_path)
    (ckpt / "model.safetensors").unlink()
    marker = tmp_path / "marker"
    (ckpt / name).write_bytes(pickle.dumps({"w": _Payload(marker)}))
    for call in (load_pretrained, resolve_checkpoint, resolve_model_source, load_tokenizer):
        with pytest.raises(UnsafeCheckpointError, match=rf"only pickle-based weights \({name}\).*safetensors.*GGUF"):
            call(ckpt)
    assert not marker.exists()


def test_pickle_beside_safetensors_is_ignored(tmp_path, tiny):
    ckpt = copy_tiny(tmp_path)
    (ckpt / "pytorch_model.bin").write_bytes(b"not even a pickle")
    _, params = load_pretrained(ckpt)
    np.testing.assert_array_equal(np.asarray(params["norm"]), np.asarray(tiny[1]["norm"]))


def test_embedded_stories260k_is_the_auto_model():
    from fedhl_jax.assets import ASSETS_DIR, embedded_model_dir
    from fedhl_jax.model.hub import resolve_model_source

    src = resolve_model_source("auto")
    assert src.kind == "embedded" and src.path == str(ASSETS_DIR / "stories260K-hf") == str(embedded_model_dir())
    assert "stories260K" in src.description
    assert resolve_checkpoint("auto") == src.path
    for f in ("LICENSE", "PROVENANCE.md"):
        assert (embedded_model_dir() / f).is_file()
    cfg, params = load_pretrained("auto")
    golden = np.load(GOLDEN / "stories260K_logits.npz")
    diff = np.abs(np.asarray(jax.jit(partial(forward, cfg))(params, golden["tokens"])) - golden["logits"]).max()
    assert diff < 1e-4, diff
    assert load_tokenizer("auto")("Once upon a time").input_ids == [1, 403, 407, 261, 378]


def test_model_source_resolution(tmp_path):
    from fedhl_jax.model.hub import resolve_model_source

    assert resolve_model_source("random").kind == "random"
    assert resolve_model_source(TINY).kind == "local"
    assert (resolve_model_source("owner/some-model").kind, resolve_model_source("owner/some-model").path) == \
        ("hub", "owner/some-model")
    for missing in (str(tmp_path / "no_model"), "./no_model", "a/b/c"):
        with pytest.raises(FileNotFoundError) as e:
            resolve_model_source(missing)
        msg = str(e.value)
        assert missing in msg and "auto" in msg and "Hub id" in msg
    f = tmp_path / "config.json"
    f.write_text("{}")
    with pytest.raises(FileNotFoundError, match="is a file, not a checkpoint folder"):
        resolve_model_source(f)
