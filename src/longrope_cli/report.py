"""Tables and plots of an eval's results.json: what a user looks at to decide whether an extension worked.

Everything here reads only the results document, so a finished (or interrupted) run can be re-rendered
without a model: `print_report(load_results("runs/eval"))`, `write_plots(results, "runs/eval")`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from longrope_cli.lengths import format_length

PLOTS = ("ppl_vs_length.png", "passkey.png", "factors.png")


def _value(x: Any) -> float:
    """A perplexity from results.json as a float ("inf" is how JSON holds a diverged one)."""
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.inf


def _methods(results: dict[str, Any]) -> list[str]:
    return [m["label"] for m in results.get("methods", [])]


def perplexity_grid(results: dict[str, Any]) -> dict[str, dict[int, float]]:
    """{method: {length: perplexity}} for the cells present (an interrupted run has holes)."""
    grid: dict[str, dict[int, float]] = {m: {} for m in _methods(results)}
    for cell in results.get("perplexity", []):
        grid.setdefault(cell["method"], {})[int(cell["length"])] = _value(cell["perplexity"])
    return grid


def passkey_grid(results: dict[str, Any]) -> dict[str, dict[tuple[int, float], float]]:
    """{method: {(length, depth): accuracy}}."""
    grid: dict[str, dict[tuple[int, float], float]] = {}
    for cell in results.get("passkey", []):
        grid.setdefault(cell["method"], {})[(int(cell["length"]), float(cell["depth"]))] = float(cell["accuracy"])
    return grid


def passkey_by_length(results: dict[str, Any]) -> dict[str, dict[int, float]]:
    """{method: {length: accuracy over all depths and trials}}."""
    sums: dict[str, dict[int, list[int]]] = {}
    for cell in results.get("passkey", []):
        entry = sums.setdefault(cell["method"], {}).setdefault(int(cell["length"]), [0, 0])
        entry[0] += int(cell["correct"])
        entry[1] += int(cell["trials"])
    return {m: {n: c / t for n, (c, t) in by.items() if t} for m, by in sums.items()}


def _length_header(length: int, original: int | None) -> str:
    if original:
        ratio = length / original
        return f"{format_length(length)}\n{ratio:g}x"
    return format_length(length)


# --------------------------------------------------------------------------- terminal


def perplexity_table(results: dict[str, Any]):
    """A rich Table: methods x lengths, the best (lowest) perplexity of each column in bold green."""
    from rich.table import Table

    grid = perplexity_grid(results)
    lengths = results.get("lengths", [])
    original = results.get("original_length")
    table = Table(title="Perplexity (eval split; lower is better)", title_justify="left")
    table.add_column("method", style="bold")
    for n in lengths:
        table.add_column(_length_header(n, original), justify="right")
    best = {n: min((grid[m].get(n, math.inf) for m in grid), default=math.inf) for n in lengths}
    for method, row in grid.items():
        cells = []
        for n in lengths:
            if n not in row:
                cells.append("[dim]-[/dim]")
                continue
            text = f"{row[n]:.2f}" if math.isfinite(row[n]) else "inf"
            cells.append(f"[bold green]{text}[/bold green]" if math.isfinite(row[n]) and row[n] == best[n] else text)
        table.add_row(method, *cells)
    return table


def passkey_table(results: dict[str, Any]):
    """A rich Table: methods x passkey lengths, accuracy over all depths; the best of each column in bold green.
    None when the run had no passkey test."""
    from rich.table import Table

    by_length = passkey_by_length(results)
    lengths = results.get("passkey_lengths", [])
    if not lengths or not by_length:
        return None
    original = results.get("original_length")
    table = Table(title="Passkey accuracy", caption="over all depths and trials; higher is better",
                  title_justify="left", caption_justify="left")
    table.add_column("method", style="bold")
    for n in lengths:
        table.add_column(_length_header(n, original), justify="right")
    best = {n: max((by_length.get(m, {}).get(n, -1.0) for m in by_length), default=-1.0) for n in lengths}
    for method in _methods(results):
        row = by_length.get(method, {})
        cells = []
        for n in lengths:
            if n not in row:
                cells.append("[dim]-[/dim]")
                continue
            text = f"{100 * row[n]:.0f}%"
            cells.append(f"[bold green]{text}[/bold green]" if row[n] == best[n] and row[n] > 0 else text)
        table.add_row(method, *cells)
    return table


def print_report(results: dict[str, Any], console: Any = None) -> None:
    """Print the perplexity table (and the passkey table, if any) to the terminal."""
    from rich.console import Console

    console = console or Console()
    console.print(perplexity_table(results))
    table = passkey_table(results)
    if table is not None:
        console.print(table)


def markdown_table(results: dict[str, Any]) -> str:
    """The same numbers as a Markdown table (perplexity per length, then passkey accuracy per length)."""
    grid = perplexity_grid(results)
    keys = passkey_by_length(results)
    lengths, pk_lengths = results.get("lengths", []), results.get("passkey_lengths", [])
    head = ["method", *[f"ppl {format_length(n)}" for n in lengths], *[f"passkey {format_length(n)}" for n in pk_lengths]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in _methods(results):
        ppl = [f"{grid[method][n]:.2f}" if n in grid.get(method, {}) else "-" for n in lengths]
        acc = [f"{100 * keys[method][n]:.0f}%" if n in keys.get(method, {}) else "-" for n in pk_lengths]
        lines.append("| " + " | ".join([method, *ppl, *acc]) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: never open a window (headless servers, CI)
    import matplotlib.pyplot as plt

    return plt


def _length_axis(ax: Any, lengths: list[int], original: int | None) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths)
    ax.set_xticklabels([format_length(n) for n in lengths])
    ax.minorticks_off()
    if original:
        ax.axvline(original, color="grey", linestyle=":", linewidth=1)
        ax.annotate("original window", (original, 1), xycoords=("data", "axes fraction"), rotation=90,
                    va="top", ha="right", fontsize=8, color="grey")


def plot_perplexity(results: dict[str, Any], path: str | Path) -> Path:
    """Perplexity vs length, one line per method (log2 x axis, log y axis); diverged cells are left out."""
    plt = _pyplot()
    grid = perplexity_grid(results)
    lengths = results.get("lengths", [])
    fig, ax = plt.subplots(figsize=(7, 4.4))
    for method, row in grid.items():
        xs = [n for n in lengths if n in row and math.isfinite(row[n])]
        ax.plot(xs, [row[n] for n in xs], marker="o", label=method)
    _length_axis(ax, lengths, results.get("original_length"))
    finite = [v for row in grid.values() for v in row.values() if math.isfinite(v) and v > 0]
    if finite and max(finite) / min(finite) > 4:  # log y only when methods diverge by a lot
        ax.set_yscale("log")
    ax.set_xlabel("evaluation length (tokens)")
    ax.set_ylabel("perplexity")
    model = results.get("provenance", {}).get("model", {}).get("name", "")
    ax.set_title(f"Perplexity vs length{f' ({model})' if model else ''}")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_passkey(results: dict[str, Any], path: str | Path) -> Path | None:
    """Passkey accuracy heat-maps, one panel per method: key depth (rows) x length (columns)."""
    grid = passkey_grid(results)
    if not grid:
        return None
    plt = _pyplot()
    methods = [m for m in _methods(results) if m in grid]
    lengths = sorted({n for cells in grid.values() for n, _ in cells})
    depths = sorted({d for cells in grid.values() for _, d in cells})
    cols = min(len(methods), 3)
    rows = math.ceil(len(methods) / cols)
    size = (1.6 + (0.9 + 0.55 * len(lengths)) * cols, 0.9 + (0.7 + 0.3 * len(depths)) * rows)
    fig, axes = plt.subplots(rows, cols, figsize=size, squeeze=False, sharey=True, constrained_layout=True)
    image = None
    for index, (ax, method) in enumerate(zip(axes.flat, methods, strict=False)):
        matrix = [[grid[method].get((n, d), math.nan) for n in lengths] for d in depths]
        image = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
        for i, row in enumerate(matrix):
            for j, value in enumerate(row):
                if not math.isnan(value):
                    ax.text(j, i, f"{100 * value:.0f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(lengths)), [format_length(n) for n in lengths], fontsize=8)
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=8)
        ax.set_title(method, fontsize=9)
        if index // cols == rows - 1 or index + cols >= len(methods):
            ax.set_xlabel("context length", fontsize=8)
        if index % cols == 0:
            ax.set_ylabel("key depth", fontsize=8)
    for ax in list(axes.flat)[len(methods):]:
        ax.axis("off")
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="accuracy")
    fig.suptitle("Passkey retrieval: % correct per (length, key depth)", fontsize=10)
    return _save(fig, path)


def plot_factors(results: dict[str, Any], path: str | Path) -> Path:
    """lambda_i vs frequency-pair index for every method at the largest evaluated length (short factors dashed)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.4))
    largest = None
    for method in results.get("methods", []):
        factors = method["factors"]
        largest = method.get("factors_at", largest)
        (line,) = ax.plot(range(len(factors["long_factor"])), factors["long_factor"], marker=".", label=method["label"])
        if factors.get("short_factor"):
            ax.plot(range(len(factors["short_factor"])), factors["short_factor"], linestyle="--",
                    color=line.get_color(), label=f"{method['label']} (short)")
    original = results.get("original_length")
    if largest and original and largest > original:
        ax.axhline(largest / original, color="grey", linestyle=":", linewidth=1)
        ax.annotate(f"s = {largest / original:g}", (0, largest / original), fontsize=8, color="grey", va="bottom")
    ax.set_yscale("log", base=2)
    ax.set_xlabel("frequency pair i (high to low frequency)")
    ax.set_ylabel("rescale factor lambda_i")
    title = "Rescale factors"
    if largest:
        title += f" at {format_length(largest)}" + (f" ({largest / original:g}x)" if original else "")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _save(fig: Any, path: str | Path) -> Path:
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)  # a reader never sees half a PNG
    return path


def write_plots(results: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """ppl_vs_length.png, passkey.png (if the run had a passkey test) and factors.png in `out_dir`."""
    out_dir = Path(out_dir)
    written = [plot_perplexity(results, out_dir / PLOTS[0]), plot_passkey(results, out_dir / PLOTS[1]),
               plot_factors(results, out_dir / PLOTS[2])]
    return [p for p in written if p is not None]
