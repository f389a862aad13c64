import json
import os
import stat

import pytest
import torch
from safetensors.torch import load_file

from paca_lightning import PaCAConfig, apply_paca, load_adapter, paca_layers, save_adapter
from paca_lightning.adapter import CONFIG_NAME, FORMAT_VERSION, WEIGHTS_NAME
from tests.helpers import make_tiny_gpt2, make_tiny_llama, token_batch


def trained(model, config, steps=2):
    apply_paca(model, config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(steps):
        model(**token_batch(seed=step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_adapter_round_trip_reproduces_the_trained_model_bit_for_bit(tmp_path, family):
    make = make_tiny_llama if family == "llama" else make_tiny_gpt2
    config = PaCAConfig(rank=4, alpha=6, bias="all" if family == "gpt2" else "none")
    model = trained(make(), config).eval()
    save_adapter(model, tmp_path)
    restored = load_adapter(make(), tmp_path).eval()
    with torch.no_grad():
        batch = token_batch(seed=7)
        assert torch.equal(restored(**batch).logits, model(**batch).logits)
    for (name, a), (_, b) in zip(model.state_dict().items(), restored.state_dict().items()):
        assert torch.equal(a, b), name
    assert [n for n, p in restored.named_parameters() if p.requires_grad] == \
        [n for n, p in model.named_parameters() if p.requires_grad]


def test_adapter_files_hold_only_columns_indices_and_config(tmp_path):
    model = trained(make_tiny_llama(), PaCAConfig(rank=4))
    save_adapter(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    tensors = load_file(str(tmp_path / WEIGHTS_NAME))
    layers = dict(paca_layers(model))
    assert set(tensors) == {f"{n}.{part}" for n in layers for part in ("paca_weight", "paca_indices")}
    for name, layer in layers.items():
        assert tensors[f"{name}.paca_indices"].dtype == torch.int32
        assert tensors[f"{name}.paca_weight"].shape == (layer.out_features, 4)
    description = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert description["config"] == PaCAConfig(rank=4).to_dict()
    assert description["format_version"] == FORMAT_VERSION


def test_load_without_training_flags_freezes_everything(tmp_path):
    save_adapter(trained(make_tiny_llama(), PaCAConfig(rank=4)), tmp_path)
    model = load_adapter(make_tiny_llama(), tmp_path, trainable=False)
    assert not any(p.requires_grad for p in model.parameters())


def test_load_onto_a_model_with_other_module_names_is_rejected(tmp_path):
    save_adapter(trained(make_tiny_llama(), PaCAConfig(rank=4)), tmp_path)
    with pytest.raises(ValueError, match=r"do not exist in GPT2LMHeadModel"):
        load_adapter(make_tiny_gpt2(), tmp_path)


def test_load_onto_a_model_with_other_shapes_is_rejected(tmp_path):
    save_adapter(trained(make_tiny_llama(), PaCAConfig(rank=4)), tmp_path)
    wider = make_tiny_llama(intermediate_size=80)
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp.gate_proj' was trained on in_features=64, "
                                         r"out_features=96.*out_features=80"):
        load_adapter(wider, tmp_path)


def test_truncated_safetensors_file_is_reported_by_path(tmp_path):
    save_adapter(trained(make_tiny_llama(), PaCAConfig(rank=4)), tmp_path)
    weights = tmp_path / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match=rf"{WEIGHTS_NAME} is truncated or corrupt"):
        load_adapter(make_tiny_llama(), tmp_path)
    weights.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_adapter(make_tiny_llama(), tmp_path)


def test_config_from_a_newer_format_asks_for_an_upgrade(tmp_path):
    save_adapter(trained(make_tiny_llama(), PaCAConfig(rank=4)), tmp_path)
    path = tmp_path / CONFIG_NAME
    description = json.loads(path.read_text())
    description["format_version"] = FORMAT_VERSION + 1
    path.write_text(json.dumps(description))
    with pytest.raises(ValueError, match=rf"format_version {FORMAT_VERSION + 1}.*Upgrade paca-lightning"):
        load_adapter(make_tiny_llama(), tmp_path)


def test_missing_and_malformed_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        load_adapter(make_tiny_llama(), tmp_path)
    save_adapter(trained(make_tiny_llama(), PaCAConfig(rank=4)), tmp_path)
    (tmp_path / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match=rf"{CONFIG_NAME} is not valid JSON"):
        load_adapter(make_tiny_llama(), tmp_path)


def test_tensors_not_matching_the_config_are_rejected(tmp_path):
    save_adapter(trained(make_tiny_llama(), PaCAConfig(rank=4)), tmp_path)
    path = tmp_path / CONFIG_NAME
    description = json.loads(path.read_text())
    description["modules"]["model.layers.9.mlp.up_proj"] = description["modules"]["model.layers.0.mlp.up_proj"]
    path.write_text(json.dumps(description))
    with pytest.raises(ValueError, match=r"missing tensors \['model.layers.9.mlp.up_proj.paca_indices'"):
        load_adapter(make_tiny_llama(), tmp_path)


def test_save_refuses_a_model_without_paca(tmp_path):
    with pytest.raises(ValueError, match="no PaCA layers"):
        save_adapter(make_tiny_llama(), tmp_path)


def test_adapter_files_get_the_usual_permissions(tmp_path):
    save_adapter(trained(make_tiny_llama(), PaCAConfig(rank=4)), tmp_path)
    umask = os.umask(0)
    os.umask(umask)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask
    assert not list(tmp_path.glob(".*.partial"))


def _edit(directory, *, tensors=None, description=None):
    """Rewrite an adapter's files by hand, as a tool or a person might, keeping the checksum valid."""
    from paca_lightning.adapter import write_adapter

    saved_tensors = load_file(directory / WEIGHTS_NAME)
    saved_description = json.loads((directory / CONFIG_NAME).read_text())
    saved_description.pop("weights_sha256", None)
    write_adapter(tensors(saved_tensors) if tensors else saved_tensors,
                  description(saved_description) if description else saved_description, directory)


def test_indices_stored_in_another_order_load_with_their_own_columns(tmp_path):
    model = trained(make_tiny_llama(), PaCAConfig(rank=4))
    save_adapter(model, tmp_path)

    def reverse(tensors):
        for key in [k for k in tensors if k.endswith(".paca_indices")]:
            name = key.removesuffix(".paca_indices")
            tensors[key] = tensors[key].flip(0)
            tensors[f"{name}.paca_weight"] = tensors[f"{name}.paca_weight"].flip(1)
        return tensors

    _edit(tmp_path, tensors=reverse)
    fresh = load_adapter(make_tiny_llama(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(**token_batch()).logits, model(**token_batch()).logits, rtol=0, atol=0)


@pytest.mark.parametrize("damage, message", [
    (lambda t, k: t.__setitem__(k + ".paca_indices", t[k + ".paca_indices"].float() + 0.5),
     r"paca_indices is a torch.float32 tensor.*1-D int32 or int64"),
    (lambda t, k: t.__setitem__(k + ".paca_indices", t[k + ".paca_indices"].bool()), r"torch.bool tensor"),
    (lambda t, k: t.__setitem__(k + ".paca_weight", t[k + ".paca_weight"].to(torch.int32)),
     r"paca_weight is a torch.int32 tensor; trained values are floating point"),
    (lambda t, k: t[k + ".paca_weight"].__setitem__((0, 0), float("nan")), r"paca_weight holds NaN or infinite"),
], ids=["fractional-indices", "bool-indices", "integer-weights", "nan-weights"])
def test_malformed_adapter_tensors_are_refused_by_name(tmp_path, damage, message):
    save_adapter(trained(make_tiny_llama(), PaCAConfig(rank=4)), tmp_path)

    def edit(tensors):
        damage(tensors, "model.layers.0.self_attn.q_proj")
        return tensors

    _edit(tmp_path, tensors=edit)
    with pytest.raises(ValueError, match=message):
        load_adapter(make_tiny_llama(), tmp_path)


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(format_version=0), r"format_version 0; .* reads format_version 1 to"),
    (lambda d: d.update(format_version=-5), r"format_version -5"),
    (lambda d: d.update(format_version=True), r"format_version True"),
    (lambda d: d.update(modules=[]), r"the 'modules' entry is a list, expected a JSON object"),
    (lambda d: d.pop("config"), r"the 'config' entry is missing"),
    (lambda d: d["modules"].update({"model.layers.0.self_attn.q_proj": 3}), r"modules\['model.layers.0.self_attn"
                                                                           r".q_proj'\] is 3, expected a JSON object"),
    (lambda d: d["modules"]["model.layers.0.self_attn.q_proj"].pop("rank"), r"\['rank'\] is None, expected a number"),
    (lambda d: d["modules"]["model.layers.0.self_attn.q_proj"].update(layout="conv2d"), r"'layout'\] is 'conv2d'"),
], ids=["version-0", "version-negative", "version-bool", "modules-list", "no-config", "module-not-object",
        "no-rank", "bad-layout"])
def test_malformed_adapter_configs_are_refused_by_name(tmp_path, change, message):
    save_adapter(trained(make_tiny_llama(), PaCAConfig(rank=4)), tmp_path)

    def edit(description):
        change(description)
        return description

    _edit(tmp_path, description=edit)
    with pytest.raises(ValueError, match=rf"{CONFIG_NAME}.*{message}"):
        load_adapter(make_tiny_llama(), tmp_path)


def test_flipped_bytes_in_the_weights_are_detected_by_the_checksum(tmp_path):
    save_adapter(trained(make_tiny_llama(), PaCAConfig(rank=4)), tmp_path)
    weights = tmp_path / WEIGHTS_NAME
    data = bytearray(weights.read_bytes())
    for offset in range(len(data) - 40, len(data)):  # inside the last tensor's values, not the header
        data[offset] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"does not match the checksum .* records for it"):
        load_adapter(make_tiny_llama(), tmp_path)
