"""What every command line of the pack shares: a parser whose --help shows each option's help and default, the
options of a config dataclass (its field comments are their help), logging, and the filter for library notices
a user can do nothing about."""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import logging
import re
import typing


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every option with its default (where it has one)."""

    def _get_help_string(self, action):
        if action.required or action.default is None:
            return action.help
        return super()._get_help_string(action)


def make_parser(module: str, doc: str | None) -> argparse.ArgumentParser:
    """A parser whose usage reads `python -m <module>`, as the README runs it."""
    return argparse.ArgumentParser(prog=f"python -m {module}", description=doc, formatter_class=HelpFormatter)


def add_model_arguments(parser: argparse.ArgumentParser, required: bool = False) -> None:
    """--model and what single files need beside it (read back by `model_kwargs`)."""
    parser.add_argument("--model", required=required, default=None if required else "tiny",
                        help="tiny (tiny-sdxl, tiny-sd3: the world in those architectures), a diffusers folder or a "
                             "single-file checkpoint")
    parser.add_argument("--tokenizer-dir", help="CLIP tokenizer folder, for single-file checkpoints")
    parser.add_argument("--config-dir", help="a diffusers folder of the same family whose configs describe the "
                                             "file: for SD3 single files, and SDXL ones not of SDXL base's size")


def model_kwargs(args: argparse.Namespace) -> dict:
    """load_pipeline's keyword arguments from `add_model_arguments`' options."""
    return {"tokenizer_dir": args.tokenizer_dir, "config_dir": args.config_dir}


def field_help(cls) -> dict[str, str]:
    """{field: the comment after it} from a dataclass's source: a config's fields are documented once, there."""
    source = inspect.getsource(cls)
    return {m.group(1): m.group(2).strip() for m in re.finditer(r"^\s+(\w+):[^#\n]*#\s*(.+)$", source, re.M)}


def boolean(text: str) -> bool:
    value = text.strip().lower()
    if value not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        raise argparse.ArgumentTypeError(f"{text!r}: expected true or false")
    return value in ("1", "true", "yes", "on")


def _kind(hint, default):
    """(argparse type, nargs) of a field from its annotation (Optional[X] -> X) and default (tuples give nargs)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if typing.get_origin(hint) is typing.Union and len(args) == 1 else hint
    if base is tuple or typing.get_origin(base) is tuple:
        items = typing.get_args(base)
        if not items:   # a bare `tuple` annotation: the default says what it holds
            return type(default[0]), "+"
        return items[0], ("+" if items[-1] is Ellipsis else len(items))
    return (boolean if base is bool else base), None


def add_config_arguments(parser: argparse.ArgumentParser, cls, defaults, skip=(), required=()) -> list[str]:
    """One --option per field of the dataclass `cls` (not in skip), with `defaults`' values and the field
    comments as help; returns the field names added."""
    helps, hints, names = field_help(cls), typing.get_type_hints(cls), []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = None if f.name in required else getattr(defaults, f.name)
        kind, nargs = _kind(hints[f.name], default)
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=kind, nargs=nargs, default=default,
                            required=f.name in required,
                            help=helps.get(f.name, f.name.replace("_", " ")).replace("%", "%%"))
        names.append(f.name)
    return names


def config_values(args: argparse.Namespace, names: list[str]) -> dict:
    """The parsed values of add_config_arguments' fields, lists back to tuples."""
    return {n: tuple(v) if isinstance(v, list) else v for n, v in ((n, getattr(args, n)) for n in names)}


class _DropNotices(logging.Filter):
    """Drops library log records matching any of the patterns."""

    def __init__(self, patterns: tuple[str, ...]):
        super().__init__()
        self.patterns = patterns

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(p in record.getMessage() for p in self.patterns)


# notices that say nothing a user of this pack can act on: the pack needs no torchvision (transformers falls back
# to its PIL image processors, which are what the pack's scorers replicate anyway)
LIBRARY_NOTICES = {"transformers.utils.import_utils": ("requires torchvision (not installed)",)}


def quiet_libraries() -> None:
    """Filter LIBRARY_NOTICES (idempotent); the entry points call it."""
    for name, patterns in LIBRARY_NOTICES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNotices) for f in logger.filters):
            logger.addFilter(_DropNotices(patterns))


def setup_logging(level: int = logging.INFO) -> None:
    """A command line's logging: the pack's progress lines on stderr, library notices filtered."""
    logging.basicConfig(level=level, format="%(message)s")
    quiet_libraries()
