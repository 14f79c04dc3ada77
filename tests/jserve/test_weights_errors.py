"""Every bad-input path of model loading raises an error that names the file, tensor or field."""

from __future__ import annotations

import json
import re
import shutil
import struct

import numpy as np
import pytest
from safetensors.numpy import save_file

from jserve.models import ConfigError, load
from jserve.weights.gguf_file import GGUFError
from jserve.weights.loader import WeightError
from jserve.weights.safetensors_file import SafetensorsError


@pytest.fixture
def llama_dir(hf_checkpoints, tmp_path):
    """A private copy of the tiny float32 Llama checkpoint that a test may damage."""
    src = hf_checkpoints("llama").path
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    return dst


def _tensors(d) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return dict(load_file(str(d / "model.safetensors")))


def test_missing_directory_and_unknown_preset(tmp_path):
    with pytest.raises(ConfigError, match="neither a preset .* nor an existing path"):
        load(str(tmp_path / "absent"))
    with pytest.raises(ConfigError, match="llama-9000"):
        load("llama-9000")


def test_missing_config_json(llama_dir):
    (llama_dir / "config.json").unlink()
    with pytest.raises(ConfigError, match=r"no config\.json in model directory .*model"):
        load(llama_dir)


@pytest.mark.parametrize("text", ["{", "[" * 100_000 + "]" * 100_000], ids=["truncated", "nested too deeply"])
def test_corrupt_config_json(llama_dir, text):
    (llama_dir / "config.json").write_text(text)
    with pytest.raises(ConfigError, match=r"cannot parse .*config\.json"):
        load(llama_dir)


def test_config_missing_field(llama_dir):
    cfg = json.loads((llama_dir / "config.json").read_text())
    del cfg["hidden_size"]
    (llama_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="missing field 'hidden_size'"):
        load(llama_dir)


def test_unsupported_architecture(llama_dir):
    cfg = json.loads((llama_dir / "config.json").read_text())
    cfg["model_type"], cfg["architectures"] = "gpt2", ["GPT2LMHeadModel"]
    (llama_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="unsupported model_type 'gpt2'"):
        load(llama_dir)


def test_unsupported_rope_scaling(llama_dir):
    cfg = json.loads((llama_dir / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    (llama_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"config\.json: unsupported rope_parameters\.rope_type 'yarn'"):
        load(llama_dir)


def test_missing_weights_file(llama_dir):
    (llama_dir / "model.safetensors").rename(llama_dir / "pytorch_model.bin")
    with pytest.raises(SafetensorsError, match=r"no safetensors weights .*pytorch_model\.bin"):
        load(llama_dir)


def test_truncated_safetensors(llama_dir):
    f = llama_dir / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    with pytest.raises(SafetensorsError, match=r"truncated safetensors file .*model\.safetensors: tensor '"):
        load(llama_dir)


def test_truncated_safetensors_header(llama_dir):
    f = llama_dir / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(SafetensorsError, match=r"header length \d+ exceeds file size 100"):
        load(llama_dir)


def test_corrupt_safetensors_header(llama_dir):
    f = llama_dir / "model.safetensors"
    body = b"\xff\xfe not json at all" + b" " * 16
    f.write_bytes(struct.pack("<Q", len(body)) + body)
    with pytest.raises(SafetensorsError, match=r"corrupt safetensors header in .*model\.safetensors"):
        load(llama_dir)


def test_shape_mismatch_names_the_tensor(llama_dir):
    t = _tensors(llama_dir)
    t["model.layers.1.mlp.up_proj.weight"] = np.zeros((95, 64), np.float32)
    save_file(t, str(llama_dir / "model.safetensors"))
    with pytest.raises(WeightError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight' in .* has shape \[95, 64\], "
                                          r"expected \[96, 64\]"):
        load(llama_dir)


def test_dtype_mismatch_names_the_tensor(llama_dir):
    t = _tensors(llama_dir)
    t["model.norm.weight"] = np.ones(64, np.int32)
    save_file(t, str(llama_dir / "model.safetensors"))
    with pytest.raises(WeightError, match=r"'model\.norm\.weight' .* has dtype int32"):
        load(llama_dir)


def test_missing_tensor(llama_dir):
    t = _tensors(llama_dir)
    del t["model.layers.0.self_attn.k_proj.weight"]
    save_file(t, str(llama_dir / "model.safetensors"))
    with pytest.raises(WeightError, match=r"missing tensor 'model\.layers\.0\.self_attn\.k_proj\.weight'"):
        load(llama_dir)


def test_leftover_tensor(llama_dir):
    t = _tensors(llama_dir)
    t["model.layers.0.self_attn.extra_proj.weight"] = np.zeros((4, 4), np.float32)
    save_file(t, str(llama_dir / "model.safetensors"))
    with pytest.raises(WeightError, match=r"left over .*model\.layers\.0\.self_attn\.extra_proj\.weight"):
        load(llama_dir)


def test_sharded_index_names_a_missing_shard(hf_checkpoints, tmp_path):
    dst = tmp_path / "sharded"
    shutil.copytree(hf_checkpoints("llama", sharded=True).path, dst)
    shard = sorted(dst.glob("*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(SafetensorsError, match=shard.name):
        load(dst)


def test_bad_gguf_files(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + b"\0" * 64)
    with pytest.raises(GGUFError, match=r"bad magic .*bad\.gguf"):
        load(bad)
    trunc = tmp_path / "trunc.gguf"
    trunc.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 1, 5))  # promises 5 key/values, has none
    with pytest.raises(GGUFError, match=r"truncated GGUF file .*trunc\.gguf"):
        load(trunc)


def test_gguf_missing_architecture_field(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ConfigError, match="missing GGUF field 'llama.embedding_length'"):
        load(path)


def test_bad_dtype_argument(hf_checkpoints):
    with pytest.raises(ConfigError, match="dtype"):
        load(hf_checkpoints("llama").path, dtype="int8")


@pytest.mark.parametrize("field, value, message", [
    # was TypeError from int(None) (a traceback from the jserve command)
    ("max_position_embeddings", None, "field 'max_position_embeddings' must be an integer, got None"),
    # was a bare "invalid literal for int() with base 10: 'two'"
    ("num_key_value_heads", "two", "field 'num_key_value_heads' must be an integer, got 'two'"),
    # was a bare "could not convert string to float: 'x'"
    ("rms_norm_eps", "x", "field 'rms_norm_eps' must be a finite number > 0, got 'x'"),
    # was AttributeError: 'int' object has no attribute 'get'
    ("rope_scaling", 5, "field 'rope_scaling' must be an object, got 5"),
])
def test_config_fields_of_the_wrong_type_name_the_file(llama_dir, field, value, message):
    cfg = json.loads((llama_dir / "config.json").read_text())
    cfg[field] = value
    (llama_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"config\.json: " + re.escape(message)):
        load(llama_dir)


def test_config_json_that_is_not_utf8_names_the_file(llama_dir):
    (llama_dir / "config.json").write_bytes(b"{\xff\xfe}")
    with pytest.raises(ConfigError, match=r"config\.json"):  # was a bare UnicodeDecodeError
        load(llama_dir)


def test_gguf_metadata_of_the_wrong_type_names_the_file(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_string("llama.embedding_length", "wide")  # a string where a count belongs
    w.add_block_count(2)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ConfigError, match=r"m\.gguf: a metadata field has the wrong type or value"):
        load(path)


def _leaves(model) -> list[np.ndarray]:
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(model.state)]


def _first_chunk(entry):
    return next(p for p in sorted(entry.rglob("*")) if p.is_file() and p.name[0].isdigit())


@pytest.mark.parametrize("damage", ["index", "deleted chunk", "truncated chunk"])
def test_a_damaged_weight_cache_entry_is_converted_again(llama_dir, tmp_path, damage):
    """The cache is derived data: a damaged entry used to make the model unloadable for good (a bare
    JSONDecodeError), and a deleted chunk was read back as zeros. Now it warns, converts and rewrites."""
    cache = tmp_path / "cache"
    first = load(llama_dir, cache=cache)
    assert first.load_info["cache"] == "miss"
    entry = next(cache.iterdir())
    if damage == "index":
        (entry / "params.json").write_text("{")
    elif damage == "deleted chunk":
        _first_chunk(entry).unlink()
    else:
        chunk = _first_chunk(entry)
        chunk.write_bytes(chunk.read_bytes()[:10])
    with pytest.warns(UserWarning, match=f"weight cache entry {entry} is unreadable"):
        again = load(llama_dir, cache=cache)
    assert again.load_info["cache"] == "miss"
    for a, b in zip(_leaves(first), _leaves(again), strict=True):
        np.testing.assert_array_equal(a, b)
    assert load(llama_dir, cache=cache).load_info["cache"] == "hit"  # rewritten


def test_an_unwritable_weight_cache_still_loads_the_model(llama_dir, tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")  # the cache directory cannot be created (was NotADirectoryError: no model)
    with pytest.warns(UserWarning, match="cannot write the weight cache"):
        model = load(llama_dir, cache=not_a_dir)
    assert model.load_info["cache"] == "off"
    for a, b in zip(_leaves(model), _leaves(load(llama_dir)), strict=True):
        np.testing.assert_array_equal(a, b)


def _edit_header(path, edit) -> None:
    """Rewrite a safetensors file's JSON header with ``edit(header)``, keeping its data."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


def _edit_index(d, edit) -> None:
    index = d / "model.safetensors.index.json"
    j = json.loads(index.read_text())
    edit(j)
    index.write_text(json.dumps(j))


def _set_config(d, **fields) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(fields)
    (d / "config.json").write_text(json.dumps(cfg))


# Each damage raised a raw Python exception (a traceback from the jserve command) before.
DAMAGES = {
    "data_offsets strings": (  # TypeError: unsupported operand type(s) for -: 'str' and 'str'
        False, lambda d: _edit_header(d / "model.safetensors",
                                      lambda h: h["model.norm.weight"].update(data_offsets=["0", "256"])),
        SafetensorsError, r"model\.safetensors: data_offsets must be two integers >= 0, got \['0', '256'\]"),
    "shape strings": (  # int("64") was taken
        False, lambda d: _edit_header(d / "model.safetensors", lambda h: h["model.norm.weight"].update(shape=["64"])),
        SafetensorsError, r"'model\.norm\.weight' in .*model\.safetensors: shape must be a list of integers"),
    "dtype a list": (  # TypeError: unhashable type: 'list'
        False, lambda d: _edit_header(d / "model.safetensors", lambda h: h["model.norm.weight"].update(dtype=["F32"])),
        SafetensorsError, r"'model\.norm\.weight' in .*model\.safetensors has unsupported dtype \['F32'\]"),
    "weight_map a list": (  # AttributeError: 'list' object has no attribute 'values'
        True, lambda d: _edit_index(d, lambda j: j.update(weight_map=[1])),
        SafetensorsError, r"model\.safetensors\.index\.json: field 'weight_map' must be an object"),
    "weight_map value an int": (  # TypeError: '<' not supported between instances of 'int' and 'str'
        True, lambda d: _edit_index(d, lambda j: j["weight_map"].update({"model.norm.weight": 5})),
        SafetensorsError, r"index\.json: field 'weight_map' maps tensor 'model\.norm\.weight' to 5, not a file name"),
    "linear rope_scaling without factor": (  # KeyError: 'factor'
        False, lambda d: _set_config(d, rope_parameters={"rope_type": "linear", "rope_theta": 10000.0}),
        ConfigError, r"config\.json: rope_parameters of type linear lacks field 'factor'"),
    "linear rope_scaling (4.x) without factor": (
        False, lambda d: _set_config(d, rope_scaling={"type": "linear"}),
        ConfigError, r"config\.json: rope_scaling of type linear lacks field 'factor'"),
}


@pytest.fixture
def damaged(hf_checkpoints, tmp_path):
    def make(damage: str):
        sharded, edit, error, message = DAMAGES[damage]
        d = tmp_path / "model"
        shutil.copytree(hf_checkpoints("llama", sharded=sharded).path, d)
        edit(d)
        return d, error, message

    return make


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_malformed_files_raise_the_modules_own_error_naming_file_and_field(damaged, damage):
    d, error, message = damaged(damage)
    with pytest.raises(error, match=message):
        load(d)


@pytest.mark.parametrize("damage", ["data_offsets strings", "weight_map a list", "linear rope_scaling without factor"])
def test_jserve_generate_prints_one_line_for_a_malformed_model(damaged, damage, capsys):
    from jserve.cli import main

    d, _, message = damaged(damage)
    with pytest.raises(SystemExit) as exc:
        main(["generate", "hi", "--model", str(d)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("jserve: error: cannot load model") and err.count("\n") == 1, err
    assert re.search(message, err) and "Traceback" not in err


def test_a_name_map_entry_for_a_parameter_the_model_lacks_is_refused():
    """Its tensor was read and then dropped by state_from_arrays: how an untied OPT head went missing."""
    import jax

    from jserve.weights.loader import convert_tensors
    from jserve.weights.namemap import TensorSpec

    class Source:
        def keys(self):
            return ["w", "lm_head.weight"]

        def shape(self, name):
            return (2, 2)

        def get(self, name):
            return np.zeros((2, 2), np.float32)

    specs = [TensorSpec("embed.w", "w"), TensorSpec("lm_head.w", "lm_head.weight")]
    shapes = {"embed.w": jax.ShapeDtypeStruct((2, 2), np.float32)}
    with pytest.raises(WeightError, match=r"name map fills parameter\(s\) \['lm_head\.w'\] that the model does not"):
        list(convert_tensors(Source(), specs, shapes))
