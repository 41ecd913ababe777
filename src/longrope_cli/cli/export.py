"""`longrope export`: a model directory that plain transformers loads with the factors applied."""

from __future__ import annotations

import click

from longrope_cli.cli.common import setup_logging, user_errors

EPILOG = """\b
Examples:
  $ longrope export --model testbed --factors runs/search-2k/factors.json --out runs/export-2k
  $ longrope export --model ./llama2-7b --factors long.json --short-factors short.json --target 256k --out ./llama2-7b-256k
  $ python -c "from transformers import AutoModelForCausalLM as M; M.from_pretrained('runs/export-2k')"
"""


@click.command(epilog=EPILOG)
@click.option("--model", "model_name", default="testbed", show_default=True,
              help="Local HF directory, .gguf file, or 'testbed'.")
@click.option("--factors", required=True, type=click.Path(), help="Factor file (long factors; short too if present).")
@click.option("--short-factors", type=click.Path(), default=None,
              help="Factor file whose factors become short_factor (e.g. from `longrope readjust`).")
@click.option("--target", default=None, help="Target length (default: the factor file's).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output model directory.")
@click.option("--device", default="cpu", show_default=True, help="Device used while exporting.")
@user_errors
def export(model_name: str, factors: str, short_factors: str | None, target: str | None, out: str, device: str) -> None:
    """Write a Hugging Face model directory (config rope_type: longrope, short_factor, long_factor)
    that `AutoModelForCausalLM.from_pretrained(OUT)` loads without longrope installed.

    Factors with n-hat > 0 are refused: transformers cannot keep start tokens un-interpolated."""
    from longrope_cli.api import export as export_api

    setup_logging()
    path = export_api(model_name, factors, out, short_factors=short_factors, target_length=target, device=device)
    click.echo(f"exported to {path}")
