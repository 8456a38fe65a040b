"""BaseSpec (model name or config JSON; random init, local checkpoint or tag), the fingerprint,
and FlatParams (every encoder parameter a view into one flat buffer)."""
from __future__ import annotations

import shutil
from pathlib import Path

import open_clip
import pytest
import torch
from helpers_residual import TINY_MODELS
from safetensors.torch import save_file

from residual_store import (
    BaseModelError,
    BaseSpec,
    FlatParams,
    backbone_family,
    embed_dim,
    fingerprint,
    image_encoder,
    input_size,
)
from residual_store.base import MODEL_CONFIG_DIR, register_model_configs
from residual_store.flat import HUGE_PAGE, huge_pages_available


@pytest.fixture(scope="module")
def fingerprints() -> dict[str, str]:
    """Fingerprint of each tiny base as BaseSpec(name).build() gives it."""
    return {name: fingerprint(image_encoder(BaseSpec(name).build())) for name in TINY_MODELS}


def perturbed(name: str, seed: int = 1) -> torch.nn.Module:
    """A tiny model whose weights differ from the seeded random ones: a stand-in checkpoint."""
    model = BaseSpec(name).build()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.01)
    return model


# --- BaseSpec ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,family,size", [("uda-tiny-vit", "vit", 32), ("uda-tiny-rn", "resnet", 64)])
def test_tiny_configs_are_registered_and_build(name, family, size):
    register_model_configs()
    assert name in open_clip.list_models()
    model = BaseSpec(name).build()
    assert not model.training
    assert image_encoder(model) is model.visual
    assert backbone_family(model) == family
    assert input_size(model) == size
    assert embed_dim(model) == 64
    with torch.no_grad():
        assert model.visual(torch.zeros(2, 3, size, size)).shape == (2, 64)
    assert BaseSpec(name).tokenizer()(["a photo of a cat."]).shape[0] == 1


@pytest.mark.parametrize("name", TINY_MODELS)
def test_same_spec_gives_the_same_fingerprint(name, fingerprints):
    torch.manual_seed(1234)  # the build is seeded on its own, whatever the global RNG holds
    assert fingerprint(image_encoder(BaseSpec(name).build())) == fingerprints[name]
    assert fingerprint(image_encoder(BaseSpec(name, "random").build())) == fingerprints[name]
    assert len(fingerprints[name]) == 64 and int(fingerprints[name], 16) >= 0


def test_build_leaves_the_global_rng_alone():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    BaseSpec("uda-tiny-vit").build()
    assert torch.equal(torch.rand(3), expected)


def test_fingerprint_sees_every_bit_and_the_dtype(fingerprints):
    model = BaseSpec("uda-tiny-vit").build()
    encoder = image_encoder(model)
    assert fingerprints["uda-tiny-vit"] != fingerprints["uda-tiny-rn"]
    p = encoder.transformer.resblocks[1].mlp.c_fc.bias
    with torch.no_grad():
        p[7] = torch.nextafter(p[7], torch.tensor(1.0))  # one ulp
    assert fingerprint(encoder) != fingerprints["uda-tiny-vit"]
    with torch.no_grad():
        p[7] = torch.nextafter(p[7], torch.tensor(-1.0))
    assert fingerprint(encoder) == fingerprints["uda-tiny-vit"]
    assert fingerprint(encoder.double()) != fingerprints["uda-tiny-vit"]


def test_pretrained_label():
    assert BaseSpec("uda-tiny-vit").pretrained_label == "random"
    assert BaseSpec("ViT-B-16", "openai").pretrained_label == "openai"


def test_model_config_json_path(tmp_path, fingerprints):
    path = tmp_path / "my-tiny-copy.json"
    shutil.copy(MODEL_CONFIG_DIR / "uda-tiny-vit.json", path)
    spec = BaseSpec(str(path))
    assert spec.model_name() == "my-tiny-copy"
    model = spec.build()
    assert input_size(model) == 32
    # same architecture, same parameter names, same seeded init: the same base
    assert fingerprint(image_encoder(model)) == fingerprints["uda-tiny-vit"]


def test_model_config_json_problems(tmp_path):
    with pytest.raises(BaseModelError, match=r"model config '.*missing\.json' not found: pass an open_clip model name"):
        BaseSpec(str(tmp_path / "missing.json")).build()
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(BaseModelError, match=r"model config '.*bad\.json' is not readable JSON"):
        BaseSpec(str(bad)).build()
    bad.write_text('{"embed_dim": 64}')
    with pytest.raises(BaseModelError, match=r"model config '.*bad\.json' lacks embed_dim/vision_cfg/text_cfg"):
        BaseSpec(str(bad)).build()


@pytest.mark.parametrize("name", TINY_MODELS)
@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".bin"])
def test_local_checkpoint_loads_with_its_fingerprint(tmp_path, name, suffix, fingerprints):
    source = perturbed(name)
    path = tmp_path / f"checkpoint{suffix}"
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    model = BaseSpec(name, str(path)).build()
    assert not model.training
    assert fingerprint(image_encoder(model)) == fingerprint(image_encoder(source))
    assert fingerprint(image_encoder(model)) != fingerprints[name]


def test_checkpoint_of_another_model_is_refused_in_one_line(tmp_path):
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in perturbed("uda-tiny-vit").state_dict().items()}, str(path))
    with pytest.raises(BaseModelError, match=r"checkpoint '.*vit\.safetensors' does not fit model uda-tiny-rn") as info:
        BaseSpec("uda-tiny-rn", str(path)).build()
    assert "\n" not in str(info.value) and len(str(info.value)) < 500


class _Touch:
    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return Path.touch, (self.path,)


def test_pickled_code_in_a_checkpoint_never_runs(tmp_path):
    marker = tmp_path / "unpickled"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": BaseSpec("uda-tiny-vit").build().state_dict(), "x": _Touch(marker)}, path)
    with pytest.raises(BaseModelError, match=r"checkpoint '.*evil\.pt' does not fit model uda-tiny-vit"):
        BaseSpec("uda-tiny-vit", str(path)).build()
    assert not marker.exists()


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".bin", ".pth"])
def test_missing_checkpoint_is_named(tmp_path, suffix):
    path = tmp_path / f"nowhere{suffix}"
    with pytest.raises(BaseModelError, match=rf"checkpoint '{path}' not found: pass an existing "
                                             r"\.pt/\.bin/\.safetensors file or a pretrained tag"):
        BaseSpec("uda-tiny-vit", str(path)).build()


def test_unknown_model_name():
    with pytest.raises(BaseModelError, match=r"unknown open_clip model 'ViT-Z-99': use a name from "
                                             r"open_clip\.list_models\(\)"):
        BaseSpec("ViT-Z-99").build()


def test_unknown_pretrained_tag_suggests_a_local_checkpoint():
    with pytest.raises(BaseModelError, match=r"unknown pretrained tag 'laion9b' for uda-tiny-vit: known tags \[\], "
                                             r"or pass a local checkpoint file \(\.pt/\.bin/\.safetensors\)"):
        BaseSpec("uda-tiny-vit", "laion9b").build()


def test_tag_needing_a_download_fails_offline_with_a_local_checkpoint_hint(monkeypatch):
    """This machine has no network; offline mode makes the hub give up at once instead of retrying."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(BaseModelError, match=r"could not load pretrained weights RN50/openai \(no network\?\): .*"
                                             r"pass it as a local file: --pretrained /path/to/") as info:
        BaseSpec("RN50", "openai").build()
    assert "\n" not in str(info.value)


# --- FlatParams ----------------------------------------------------------------------------------

@pytest.fixture(params=TINY_MODELS)
def flat_model(request):
    model = BaseSpec(request.param).build()
    return model, FlatParams(image_encoder(model))


def test_parameters_are_views_of_the_buffer(flat_model):
    model, flat = flat_model
    buffer = flat.buffer
    assert buffer.is_contiguous() and buffer.dim() == 1
    assert buffer.numel() == flat.layout.numel == sum(p.numel() for p in model.visual.parameters())
    expected_offset = 0
    for (name, p), slot in zip(model.visual.named_parameters(), flat.layout.slots):
        assert slot.name == name and slot.offset == expected_offset and slot.shape == tuple(p.shape)
        expected_offset += slot.numel
        assert p.data_ptr() == buffer.data_ptr() + slot.offset * buffer.element_size()
        assert torch.equal(p.detach().reshape(-1), buffer[slot.offset:slot.offset + slot.numel])
        assert name in flat.layout and flat.layout[name] is slot
    flat.check()
    # writes go both ways
    first = flat.layout.slots[0]
    with torch.no_grad():
        buffer[first.offset] = 123.0
        assert dict(model.visual.named_parameters())[first.name].reshape(-1)[0] == 123.0
        last = flat.layout.slots[-1]
        dict(model.visual.named_parameters())[last.name].view(-1)[-1] = -7.0
        assert buffer[-1] == -7.0


def test_flat_index_maps_local_positions(flat_model):
    _, flat = flat_model
    slot = flat.layout.slots[3]
    local = torch.tensor([0, 1, slot.numel - 1], dtype=torch.int32)
    index = flat.flat_index(slot.name, local)
    assert index.dtype == torch.int64
    assert index.tolist() == [slot.offset, slot.offset + 1, slot.offset + slot.numel - 1]


def test_forward_output_unchanged_by_flattening(flat_model):
    model, _ = flat_model
    plain = BaseSpec("uda-tiny-rn" if backbone_family(model) == "resnet" else "uda-tiny-vit").build()
    size = input_size(model)
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(model.visual(x), plain.visual(x))


def test_optimiser_step_writes_into_the_buffer(flat_model):
    model, flat = flat_model
    encoder = model.visual
    encoder.train()
    before = flat.buffer.clone()
    optimiser = torch.optim.SGD(encoder.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    size = input_size(model)
    x = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        optimiser.zero_grad()
        encoder(x).square().mean().backward()
        assert all(p.grad is not None for p in encoder.parameters())
        optimiser.step()
    flat.check()
    assert not torch.equal(flat.buffer, before)
    concatenated = torch.cat([p.detach().reshape(-1) for p in encoder.parameters()])
    assert torch.equal(flat.buffer, concatenated)


def test_check_detects_a_detached_parameter(flat_model):
    model, flat = flat_model
    name, p = list(model.visual.named_parameters())[2]
    p.data = p.data.clone()
    with pytest.raises(RuntimeError, match=rf"parameter {name} was detached from the flat buffer; "
                                           "rebuild FlatParams after moving the encoder"):
        flat.check()


def test_check_detects_a_move_after_flattening(flat_model):
    model, flat = flat_model
    model.visual.double()
    with pytest.raises(RuntimeError, match="was detached from the flat buffer"):
        flat.check()


def test_flattening_refuses_mixed_dtypes_and_empty_encoders():
    encoder = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2).half())
    with pytest.raises(ValueError, match="mixes dtypes"):
        FlatParams(encoder)
    with pytest.raises(ValueError, match="image encoder has no parameters"):
        FlatParams(torch.nn.ReLU())


def _vma_flags(address: int) -> dict[str, str]:
    """The /proc/self/smaps entries of the mapping that holds `address`."""
    fields, inside = {}, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= address < hi
        elif inside:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


@pytest.mark.skipif(not huge_pages_available(), reason="this kernel offers no transparent huge pages")
def test_a_large_cpu_buffer_is_advised_for_huge_pages():
    encoder = torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.Linear(1024, 1024))  # 8 MiB
    reference = [p.detach().clone() for p in encoder.parameters()]
    flat = FlatParams(encoder)
    assert flat.huge_pages and flat.buffer.data_ptr() % HUGE_PAGE == 0
    assert _vma_flags(flat.buffer.data_ptr()).get("THPeligible") == "1"
    flat.check()
    assert all(torch.equal(p, r) for p, r in zip(encoder.parameters(), reference))
    x = torch.randn(3, 1024)
    assert torch.equal(encoder(x), FlatParams(encoder, huge_pages=False).encoder(x))


def test_huge_pages_only_where_they_apply():
    small = FlatParams(torch.nn.Linear(8, 8))  # under one huge page: not worth one
    assert not small.huge_pages
    assert not FlatParams(torch.nn.Linear(1024, 1024), huge_pages=False).huge_pages
    with pytest.raises(ValueError, match="huge pages apply to CPU buffers"):
        FlatParams(torch.nn.Linear(2, 2, device="meta"), huge_pages=True)
