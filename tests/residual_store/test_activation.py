"""The base's activation: auto-detected QuickGELU for OpenAI's weights (tag, model name, local
checkpoint), forced on/off, built into the model, covered by the fingerprint, recorded in a
residual's `base_activation` and named when a residual is refused for it."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers_residual import build_tiny, random_tuned, residual_for
from open_clip.transformer import QuickGELU
from safetensors.torch import save_file

from residual_store import BaseModelError, BaseSpec, ResidualMismatch, check_compatible, fingerprint, from_bytes, to_bytes
from residual_store.base import MODEL_CONFIG_DIR, model_activation, openai_checkpoint_reason
from residual_store.residual import make_residual

OPENAI_EXTRAS = {"input_resolution": torch.tensor(32), "context_length": torch.tensor(32),
                 "vocab_size": torch.tensor(49408)}


@pytest.fixture(scope="module")
def tiny_state() -> dict[str, torch.Tensor]:
    """uda-tiny-vit's weights, a little away from the seeded random ones (a stand-in checkpoint)."""
    model = BaseSpec("uda-tiny-vit").build()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.01)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def activations_in(module: torch.nn.Module) -> set[str]:
    return {type(m).__name__ for m in module.modules() if isinstance(m, (QuickGELU, torch.nn.GELU))}


# --- resolution without building ------------------------------------------------------------------

@pytest.mark.parametrize("model,pretrained,expected", [
    ("ViT-B-16", "openai", "quick_gelu"),
    ("RN50", "openai", "quick_gelu"),
    ("RN50", "yfcc15m", "quick_gelu"),  # open_clip marks this tag as trained with QuickGELU too
    ("ViT-B-16", "laion2b_s34b_b88k", "gelu"),
    ("ViT-B-16-quickgelu", None, "quick_gelu"),  # the model name asks for it
    ("uda-tiny-vit", None, "gelu"),
    ("uda-tiny-vit", "random", "gelu"),
])
def test_auto_from_tag_and_model_name(model, pretrained, expected):
    assert BaseSpec(model, pretrained).activation() == expected  # nothing is downloaded


@pytest.mark.parametrize("forced,expected", [(True, "quick_gelu"), (False, "gelu")])
def test_forced_either_way(forced, expected):
    assert BaseSpec("ViT-B-16", "openai", quick_gelu=forced).activation() == expected
    assert BaseSpec("uda-tiny-vit", quick_gelu=forced).activation() == expected
    assert BaseSpec("ViT-B-16-quickgelu", quick_gelu=forced).activation() == expected


def test_describe_names_model_weights_and_activation():
    assert BaseSpec("ViT-B-16", "openai").describe() == "ViT-B-16/openai, QuickGELU"
    assert BaseSpec("uda-tiny-vit").describe() == "uda-tiny-vit/random, GELU"
    assert BaseSpec("uda-tiny-vit").pretrained_label == "random"  # metadata label unchanged


# --- local checkpoints ----------------------------------------------------------------------------

def save(state: dict[str, torch.Tensor], path: Path) -> None:
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)


def test_plain_state_dict_is_gelu(tmp_path, tiny_state):
    for suffix in (".pt", ".safetensors"):
        path = tmp_path / f"plain{suffix}"
        save(tiny_state, path)
        assert openai_checkpoint_reason(path) is None
        spec = BaseSpec("uda-tiny-vit", str(path))
        assert spec.activation() == "gelu"
        assert activations_in(spec.build().visual) == {"GELU"}


@pytest.mark.parametrize("suffix", [".pt", ".bin", ".safetensors"])
def test_state_dict_with_openai_keys_is_quick_gelu_and_loads(tmp_path, tiny_state, suffix):
    path = tmp_path / f"clip{suffix}"
    save({**tiny_state, **OPENAI_EXTRAS}, path)
    assert "OpenAI's keys" in openai_checkpoint_reason(path)
    spec = BaseSpec("uda-tiny-vit", str(path))
    assert spec.activation() == "quick_gelu"
    model = spec.build()  # the extra keys are dropped; every weight is loaded strictly
    assert activations_in(model.visual) == {"QuickGELU"}
    assert torch.equal(model.visual.conv1.weight, tiny_state["visual.conv1.weight"])


@pytest.mark.parametrize("path,named", [
    ("models--timm--vit_base_patch16_clip_224.openai/snapshots/0a1b/open_clip_pytorch_model.bin", True),
    ("weights/openai/ViT-B-16.safetensors", True),
    ("weights/ViT-B-16-openai.bin", True),
    ("runs/my_openai_test/teacher.pt", False),  # a word inside a folder name is not the weights
    ("weights/notopenai.bin", False),
])
def test_which_paths_name_openai(path, named):
    assert (openai_checkpoint_reason(Path("/nowhere") / path) is not None) == named


def test_one_openai_key_alone_is_not_enough(tmp_path, tiny_state):
    path = tmp_path / "clip.pt"
    torch.save({**tiny_state, "context_length": torch.tensor(32)}, path)
    assert BaseSpec("uda-tiny-vit", str(path)).activation() == "gelu"


def test_path_naming_openai_is_quick_gelu(tmp_path, tiny_state):
    """How HF hosts OpenAI's weights: timm/vit_base_patch16_clip_224.openai."""
    path = tmp_path / "vit_base_patch16_clip_224.openai" / "open_clip_pytorch_model.bin"
    path.parent.mkdir()
    torch.save(tiny_state, path)
    spec = BaseSpec("uda-tiny-vit", str(path))
    assert spec.activation() == "quick_gelu"
    model = spec.build()
    assert activations_in(model.visual) == {"QuickGELU"}
    assert model_activation(model) == "quick_gelu"
    # Forced off, the same file builds with GELU.
    assert activations_in(BaseSpec("uda-tiny-vit", str(path), quick_gelu=False).build().visual) == {"GELU"}


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_torchscript_archive_is_detected_and_refused_in_one_line(tmp_path):
    """OpenAI ships ViT-B-16.pt as a TorchScript archive: detected from its zip entries; reading
    it would run its pickled code, so build refuses it with what to pass instead."""
    path = tmp_path / "ViT-B-16.pt"
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(path))
    spec = BaseSpec("uda-tiny-vit", str(path))
    assert spec.activation() == "quick_gelu"
    with pytest.raises(BaseModelError, match=r"is a TorchScript archive .* pass the 'openai' tag") as info:
        spec.build()
    assert "\n" not in str(info.value)


class _Touch:
    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return Path.touch, (self.path,)


def test_detection_never_unpickles(tmp_path, tiny_state):
    marker = tmp_path / "unpickled"
    path = tmp_path / "evil.pt"
    torch.save({**tiny_state, **OPENAI_EXTRAS, "x": _Touch(marker)}, path)
    assert BaseSpec("uda-tiny-vit", str(path)).activation() == "quick_gelu"
    assert not marker.exists()


def test_a_quickgelu_model_config_can_be_forced_off(tmp_path):
    cfg = json.loads((MODEL_CONFIG_DIR / "uda-tiny-vit.json").read_text())
    path = tmp_path / "uda-tiny-vit-qg.json"
    path.write_text(json.dumps({**cfg, "quick_gelu": True}))
    assert activations_in(BaseSpec(str(path)).build().visual) == {"QuickGELU"}
    assert activations_in(BaseSpec(str(path), quick_gelu=False).build().visual) == {"GELU"}


# --- build and fingerprint ------------------------------------------------------------------------

def test_build_with_quick_gelu_uses_it_in_both_towers():
    model = BaseSpec("uda-tiny-vit", quick_gelu=True).build()
    assert activations_in(model.visual) == {"QuickGELU"}
    assert activations_in(model.transformer) == {"QuickGELU"}
    assert model_activation(model) == "quick_gelu"
    plain = BaseSpec("uda-tiny-vit", quick_gelu=False).build()
    assert activations_in(plain.visual) == {"GELU"}
    assert model_activation(plain) == "gelu"


def test_same_weights_other_activation_other_fingerprint():
    gelu = BaseSpec("uda-tiny-vit").build()
    quick = BaseSpec("uda-tiny-vit", quick_gelu=True).build()
    for a, b in zip(gelu.visual.parameters(), quick.visual.parameters()):
        assert torch.equal(a, b)  # seeded: the very same weights
    assert fingerprint(gelu.visual) != fingerprint(quick.visual)
    assert fingerprint(quick.visual) == fingerprint(BaseSpec("uda-tiny-vit", quick_gelu=True).build().visual)


def test_a_resnet_encoder_has_no_gelu_so_its_fingerprint_ignores_the_activation():
    gelu = BaseSpec("uda-tiny-rn").build()
    quick = BaseSpec("uda-tiny-rn", quick_gelu=True).build()
    assert activations_in(gelu.visual) == activations_in(quick.visual) == set()
    assert fingerprint(gelu.visual) == fingerprint(quick.visual)
    assert model_activation(quick) == "quick_gelu"  # the text tower has it


# --- the residual's record and the refusal --------------------------------------------------------

@pytest.fixture(scope="module")
def gelu_vit():
    return build_tiny("uda-tiny-vit")


@pytest.fixture(scope="module")
def quick_residual():
    """A residual made on uda-tiny-vit built with QuickGELU, recording it."""
    quick = BaseSpec("uda-tiny-vit", quick_gelu=True)
    model = quick.build()
    tiny = build_tiny("uda-tiny-vit")
    residual = residual_for(tiny, random_tuned(tiny.base_state, ["conv1.weight"], 0.1, 0),
                            fingerprint_=fingerprint(model.visual), base_activation=quick.activation())
    return from_bytes(to_bytes(residual))


def test_make_residual_records_the_activation(gelu_vit):
    head = torch.nn.Module()
    head.fc = torch.nn.Linear(gelu_vit.dim, 2, bias=False)
    head.head_type = "cosine"
    kwargs = dict(task="T", classes=["a", "b"], base_model="uda-tiny-vit", base_pretrained="random",
                  base_fingerprint=gelu_vit.fingerprint)
    residual = make_residual({}, head, **kwargs, base_activation="quick_gelu")
    assert from_bytes(to_bytes(residual)).base_activation == "quick_gelu"
    assert "base_activation" not in make_residual({}, head, **kwargs).metadata  # as older files
    with pytest.raises(ValueError, match=r"base_activation 'relu' is not one of"):
        make_residual({}, head, **kwargs, base_activation="relu")


def test_quick_gelu_residual_refused_by_a_gelu_base_names_both(gelu_vit, quick_residual):
    assert quick_residual.base_activation == "quick_gelu"
    with pytest.raises(ResidualMismatch) as info:
        check_compatible(quick_residual, gelu_vit.layout, gelu_vit.fingerprint, gelu_vit.dim,
                         activation="gelu")
    text = str(info.value)
    assert "trained on a base with QuickGELU; this server's base uses GELU" in text
    assert "start uda-serve with --quick-gelu" in text
    assert "(uda-tiny-vit/random, QuickGELU)" in text and "\n" not in text


def test_gelu_residual_refused_by_a_quick_gelu_base_says_no_quick_gelu(gelu_vit):
    quick = BaseSpec("uda-tiny-vit", quick_gelu=True).build()
    residual = residual_for(gelu_vit, random_tuned(gelu_vit.base_state, ["conv1.weight"], 0.1, 1),
                            base_activation="gelu")
    with pytest.raises(ResidualMismatch, match=r"trained on a base with GELU; this server's base uses "
                                               r"QuickGELU: start uda-serve with --no-quick-gelu"):
        check_compatible(residual, gelu_vit.layout, fingerprint(quick.visual), activation="quick_gelu")


def test_refusal_without_both_activations_stays_generic(gelu_vit, quick_residual):
    with pytest.raises(ResidualMismatch, match="retrain or publish it for the served base") as info:
        check_compatible(quick_residual, gelu_vit.layout, gelu_vit.fingerprint)  # server's unknown
    assert "this server's base uses" not in str(info.value)
    legacy = from_bytes(to_bytes(quick_residual))
    del legacy.metadata["base_activation"]  # a file from before the key
    with pytest.raises(ResidualMismatch, match="retrain or publish it for the served base"):
        check_compatible(legacy, gelu_vit.layout, gelu_vit.fingerprint, activation="gelu")


def test_same_activation_and_fingerprint_is_accepted(quick_residual, gelu_vit):
    quick = BaseSpec("uda-tiny-vit", quick_gelu=True).build()
    check_compatible(quick_residual, gelu_vit.layout, fingerprint(quick.visual), gelu_vit.dim,
                     activation="quick_gelu")


def test_copying_a_config_json_keeps_its_activation(tmp_path):
    """A config JSON path resolves like its registered name."""
    path = tmp_path / "mine.json"
    shutil.copy(MODEL_CONFIG_DIR / "uda-tiny-vit.json", path)
    assert BaseSpec(str(path)).activation() == "gelu"
    assert BaseSpec(str(path), "openai").activation() == "quick_gelu"
