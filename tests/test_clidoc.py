"""docs/cli.md is generated from the CLI; it must match what the CLI says now."""

from pathlib import Path

from eqat.cli.doc import render


def test_cli_reference_matches_the_cli():
    page = Path(__file__).parents[1] / "docs" / "cli.md"
    assert page.read_text() == render(), "docs/cli.md is stale: run `python -m eqat.cli.doc > docs/cli.md`"


def test_every_command_has_examples_in_its_help():
    import typer.main

    from eqat.cli import app

    for name, cmd in typer.main.get_command(app).commands.items():
        assert cmd.epilog and "eqat " + name in cmd.epilog, name
