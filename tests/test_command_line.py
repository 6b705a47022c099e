"""ditlib/command_line.py: the shared flag groups give exactly the settings of the library's
dataclasses, with the official defaults."""
import argparse
from dataclasses import fields

from ditlib.command_line import add_device_flags, add_model_flags, add_sampler_flags, settings_from
from ditlib.samplers import SamplingSettings
from ditlib.weights import ModelSource


def parser_with_groups() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_model_flags(parser, default_vae="mse")
    add_sampler_flags(parser, cfg_scale=4.0)
    add_device_flags(parser, tf32_help="TF32")
    return parser


def test_every_setting_has_its_flag_and_the_defaults_agree():
    flags = vars(parser_with_groups().parse_args([]))
    for kind in (ModelSource, SamplingSettings):
        assert {f.name for f in fields(kind)} <= flags.keys(), kind
        assert settings_from(kind, flags) == kind()  # the flags' defaults are the dataclass's
    assert flags["device"] == "auto" and flags["tf32"] is True


def test_settings_from_takes_the_values_given():
    parser = parser_with_groups()
    flags = vars(parser.parse_args(["--ckpt", "a.pt", "--num-classes", "10", "--sampler", "ddim", "--eta", "0.5",
                                    "--cfg-interval", "0.1", "0.7", "--cfg-channels", "all", "--no-tf32"]))
    assert settings_from(ModelSource, flags) == ModelSource(ckpt="a.pt", num_classes=10)
    sampling = settings_from(SamplingSettings, flags)
    assert (sampling.sampler, sampling.eta, sampling.interval(), sampling.guide_all_channels) == \
        ("ddim", 0.5, (0.1, 0.7), True)
    assert flags["tf32"] is False
