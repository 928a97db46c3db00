"""The ``vramplan`` command line: parse, call the library, print. No logic of its own.

Each command lives in a module of this package and registers itself on ``main``;
user errors (``VramplanError``) become one line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import sys

import click

from vramplan.errors import VramplanError


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except VramplanError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(err.exit_code)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="vramplan")
def main() -> None:
    """Will this fine-tuning run fit, and with which settings? Plan it, then train it."""


def _register() -> None:
    # Imported for their side effect of adding commands to `main`; each module owns its commands.
    import importlib
    import pkgutil

    for module in pkgutil.iter_modules(__path__):
        if module.name.startswith("cmd_"):
            importlib.import_module(f"{__name__}.{module.name}")


_register()
