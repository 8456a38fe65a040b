"""TrainConfig validation: every problem reported at once, before any training."""
from __future__ import annotations

import pytest

from trainer.config import TrainConfig
from trainer.errors import ConfigError


def test_all_problems_reported_at_once(tmp_path):
    cfg = TrainConfig(source=tmp_path, target=tmp_path, batch_size=0, rst=True, tau=-1e-6, epochs=-2,
                      lr=0.0, prompt="no placeholder", method="cmkd", fixmatch_threshold=2.0)
    with pytest.raises(ConfigError) as err:
        cfg.validate()
    text = str(err.value)
    for flag in ("--batch-size 0", "--tau -1e-06", "--epochs -2", "--lr 0.0", "--prompt",
                 "--fixmatch-threshold 2.0"):
        assert flag in text
    assert len(err.value.problems) == 6


def test_data_source_choices():
    with pytest.raises(ConfigError, match="--source DIR and --target DIR are required"):
        TrainConfig().validate()
    with pytest.raises(ConfigError, match="not both"):
        TrainConfig(source="a", target="b", data_root="r").validate()
    with pytest.raises(ConfigError, match="--target-domain is required"):
        TrainConfig(data_root="r", source_domain="Art").validate()


def test_cross_field_rules(tmp_path):
    with pytest.raises(ConfigError) as err:
        TrainConfig(source=tmp_path, target=tmp_path, method="baseline", fixmatch=True,
                    device="cpu", amp=True, task="bad name!").validate()
    assert len(err.value.problems) == 3


def test_family_defaults_fill_only_unset_values(tmp_path):
    cfg = TrainConfig(source=tmp_path, target=tmp_path, lr=1e-4, rst=True)
    vit = cfg.resolve_defaults("vit")
    assert (vit.lr, vit.head_lr_mult, vit.tau) == (1e-4, 1000.0, 1e-6)
    rn = TrainConfig(source=tmp_path, target=tmp_path, rst=True).resolve_defaults("resnet")
    assert (rn.lr, rn.head_lr_mult, rn.tau) == (3e-7, 10000.0, 1e-5)
    plain = TrainConfig(source=tmp_path, target=tmp_path).resolve_defaults("vit")
    assert plain.tau is None  # no RST, no threshold: the resolved config still validates
    plain.validate()
    assert (cfg.epochs, cfg.iters_per_epoch, cfg.batch_size, cfg.seed) == (20, 500, 32, 42)
    assert cfg.ramp_steps == 10000


def test_task_name_defaults_to_domains(tmp_path):
    cfg = TrainConfig(data_root=tmp_path, source_domain="Art", target_domain="Clipart")
    assert cfg.task_name() == "Art2Clipart"


@pytest.mark.parametrize("prompt, ok", [
    ("a photo of a {}.", True), ("{} in {{braces}}", True),
    ("no placeholder", False), ("a photo of {{}}", False),  # escaped: every class reads the same
    ("a {kind} photo", False), ("{0} and {1}", False),
])
def test_prompt_must_put_the_class_name_somewhere(tmp_path, prompt, ok):
    cfg = TrainConfig(source=tmp_path, target=tmp_path, prompt=prompt)
    try:
        cfg.validate()
        problems = []
    except ConfigError as e:
        problems = [p for p in e.problems if p.startswith("--prompt")]
    assert (problems == []) == ok, problems
