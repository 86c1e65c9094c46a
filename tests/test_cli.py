"""Every command line: usage as the README runs it (`python -m ...`), help text and defaults for every option, and
config dataclasses that survive the trip through their options unchanged."""
import importlib
import re

import pytest

from r0_core import cli
from r0_core.tiny.build import BuildConfig
from r0_core.tiny.reward_stack import RewardStackConfig
from r0_core.train import R0Config
from rpo_core.train import RPOConfig

MODULES = ["r0_core.demo", "r0_core.train", "rpo_core.train", "rpo_core.dreambench", "r0_core.tiny.build",
           "r0_core.tiny.reward_stack"]


def options(help_text: str) -> dict[str, str]:
    """--option -> its help text, from argparse's options section."""
    section = help_text.split("options:", 1)[1]
    found, current = {}, None
    for line in section.splitlines():
        match = re.match(r"^  (-\w, )?(--[\w-]+)(?: [A-Z_]+(?: [A-Z_\[\].]+)*)?(?:\s{2,}(.*))?$", line)
        if match:
            current = match.group(2)
            found[current] = (match.group(3) or "").strip()
        elif current and line.startswith(" " * 10):
            found[current] = (found[current] + " " + line.strip()).strip()
    return found


@pytest.mark.parametrize("module", MODULES)
def test_help_names_the_module_and_explains_every_option(module, capsys):
    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(module).main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: python -m {module} ")
    found = options(text)
    assert len(found) >= 5, found
    bare = [name for name, help_ in found.items() if not help_]
    assert not bare, f"{module}: options without help: {bare}"


@pytest.mark.parametrize("cls, defaults, required", [
    (R0Config, R0Config(prompts=["a red circle"]), ()),
    (RPOConfig, RPOConfig(token="vum", class_name="circle"), ("token", "class_name")),
    (BuildConfig, BuildConfig(), ()), (RewardStackConfig, RewardStackConfig(), ())])
def test_config_options_round_trip(cls, defaults, required):
    parser = cli.make_parser("x", None)
    skip = ("prompts", "validation_prompts", "normalize_gradients")   # the command lines read prompts from files
    names = cli.add_config_arguments(parser, cls, defaults, skip=skip, required=required)
    given = [arg for name in required for arg in (f"--{name.replace('_', '-')}", getattr(defaults, name))]
    values = cli.config_values(parser.parse_args(given), names)
    rest = {k: getattr(defaults, k) for k in skip if hasattr(defaults, k)}
    assert cls(**values, **rest) == defaults
    assert set(names) <= set(cli.field_help(cls))   # every option's help is its field's comment


def test_booleans_are_strict():
    assert cli.boolean("True") and not cli.boolean("off")
    with pytest.raises(Exception, match="expected true or false"):
        cli.boolean("maybe")
