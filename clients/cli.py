"""`vgpa`: one command per verb. Errors that are the user's (bad input, bad settings) print one line, exit 2."""

from __future__ import annotations

import importlib
import sys

import click

from common.errors import VideoGPAError


@click.group(help="videogpa: score the 3D consistency of videos and align video diffusion models with it.")
def cli() -> None:
    pass


# Each verb lives in its own module; a module whose optional dependencies are missing is skipped
# so that `vgpa score` keeps working on a minimal install.
_COMMAND_MODULES = (
    "clients.commands.score",
    "clients.commands.demo",
    "clients.commands.train",
    "clients.commands.serve",
    "clients.commands.mine",
    "clients.commands.eval",
    "clients.commands.compare_lora",
)


def _register_commands() -> None:
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name and err.name.startswith(name):
                continue  # the verb is not written yet
            raise
        for command in getattr(module, "COMMANDS", ()):
            cli.add_command(command)


def main(argv: list[str] | None = None) -> None:
    _register_commands()
    try:
        cli.main(args=argv, prog_name="vgpa", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except VideoGPAError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
