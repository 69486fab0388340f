"""`kdtrain`: placeholder until the trainer lands (issue 5)."""

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Train a masked-diffusion student on kdtargets shards.")


@app.command()
def run(shards: str) -> None:
    """Not built yet."""
    typer.echo("error: kdtrain run is not built yet", err=True)
    raise typer.Exit(2)
