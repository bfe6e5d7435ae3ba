"""The `amp-deploy` command line: thin commands over the library; errors become exit codes."""

from __future__ import annotations

import functools
import json
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from amp_deploy.errors import GateFailed, GateUndecided, UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Prune the MLPs of a vision transformer with AMP, export, compile and validate it.")
err = Console(stderr=True, highlight=False)
out = Console(highlight=False)
_state = {"debug": False}

Device = Literal["auto", "cpu", "cuda"]
OutOpt = Annotated[Path | None, typer.Option("--out", "-o", help="Output folder (default: out/<recipe name>).")]
DeviceOpt = Annotated[str, typer.Option(help="Where to score and search: auto, cpu or cuda.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Re-run every stage even if its inputs are unchanged.")]
Overrides = Annotated[list[str] | None, typer.Argument(help="Recipe overrides as dotted KEY=VALUE, e.g. prune.threshold=0.02.",
                                                       show_default=False)]


def _handled(fn):
    """Map library errors to exit codes: 2 bad input, 1 failed gate, 3 a gate that could not judge, 130 interrupted."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except UserError as e:
            _fail(e, 2, "error")
        except GateFailed as e:
            _fail(e, 1, "failed")
        except GateUndecided as e:
            _fail(e, 3, "could not judge")
        except KeyboardInterrupt:
            err.print("interrupted: finished stages are kept; run the same command again to resume")
            raise typer.Exit(130) from None
        except OSError as e:
            if e.errno == 28:  # ENOSPC
                _fail(UserError(f"no space left on the device while writing {e.filename or 'the output'}"), 2, "error")
            raise

    return wrapper


def _fail(e: Exception, code: int, word: str):
    if _state["debug"]:
        raise e
    err.print(f"[bold red]{word}:[/bold red] {escape(str(e))}", soft_wrap=True)  # brackets in the text are text
    raise typer.Exit(code) from None


def _version(value: bool) -> None:
    if value:
        from amp_deploy._version import __version__

        out.print(f"amp-deploy {__version__}")
        raise typer.Exit()


@app.callback()
def main(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
         version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                               help="Print the version and exit.")] = False) -> None:
    """Prune the MLPs of a vision transformer with AMP, export, compile and validate it."""
    _state["debug"] = debug


class RichReporter:
    """The build's Reporter on the terminal: plain lines on stderr, secondary ones dimmed, Rich bars."""

    def __init__(self, console: Console, progress) -> None:
        self.console, self.progress = console, progress

    def log(self, message: str) -> None:
        self.console.print(message, markup=False, soft_wrap=True)

    def note(self, message: str) -> None:
        self.console.print(message, style="dim", markup=False, soft_wrap=True)

    def task(self, description: str, total: int | None):
        tid = self.progress.add_task(description, total=total)
        return lambda n=1, description=None: self.progress.update(
            tid, advance=n, **({"description": description} if description else {}))

    def clear_tasks(self) -> None:
        for tid in list(self.progress.task_ids):
            self.progress.remove_task(tid)


def _run(recipe_path: Path, out_dir: Path | None, device: str, stages, force: bool, overrides: list[str],
         nproc: int = 1):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from amp_deploy.pipeline.context import Context
    from amp_deploy.pipeline.run import run_stages
    from amp_deploy.recipe import load_recipe

    recipe = load_recipe(recipe_path, overrides)
    folder = out_dir or Path("out") / recipe.name
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=err, transient=True)
    if nproc < 1:
        raise UserError(f"--nproc {nproc}: must be at least 1")
    ctx = Context.create(recipe, folder, device, reporter=RichReporter(err, progress), nproc=nproc)
    with progress:
        run_stages(ctx, stages, force)
    return folder


@app.command()
@_handled
def build(recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.")], overrides: Overrides = None,
          out_dir: OutOpt = None, device: DeviceOpt = "auto", force: ForceOpt = False,
          nproc: Annotated[int, typer.Option(help="Score, search and distil with N processes (torchrun; one GPU each on CUDA).")] = 1) -> None:
    """Run the whole pipeline: score, search, rebuild, export, compile, validate."""
    from amp_deploy.pipeline.stages import STAGE_NAMES

    folder = _run(recipe, out_dir, device, STAGE_NAMES, force, overrides or [], nproc)
    _summary(folder / "report.json")


def _stage_command(stages: tuple[str, ...], doc: str):
    @_handled
    def command(folder: Annotated[Path, typer.Argument(help="Output folder of a build (holds recipe.yaml).")],
                device: DeviceOpt = "auto", force: ForceOpt = False) -> None:
        if not (folder / "recipe.yaml").is_file():
            raise UserError(f"{folder}: not an amp-deploy output folder (no recipe.yaml); run `amp-deploy build` first")
        _run(folder / "recipe.yaml", folder, device, stages, force, [])
        err.print(f"{', '.join(stages)}: done in {folder}")

    command.__doc__ = doc
    return command


app.command("prune")(_stage_command(("score", "search", "rebuild"),
                                    "Score neurons, search widths and write pruned.safetensors."))
app.command("distill")(_stage_command(("distill",), "Distil the pruned model from the original (distill.epochs > 0)."))
app.command("export")(_stage_command(("export",), "Export original.onnx and pruned.onnx."))
app.command("quantize")(_stage_command(("quantize",), "Quantize the exported models (quantize.formats)."))
app.command("compile")(_stage_command(("compile",), "Compile TensorRT engines from the ONNX files."))
app.command("validate")(_stage_command(("validate",), "Measure parity, fidelity, latency; write the report."))


class KeysFormat(str, Enum):
    table = "table"
    text = "text"
    md = "md"
    json = "json"


@app.command()
@_handled
def check(recipe: Annotated[Path | None, typer.Argument(help="Recipe YAML file.", show_default=False)] = None,
          overrides: Overrides = None,
          keys: Annotated[bool, typer.Option("--keys", help="List every recipe key with its default and meaning.")] = False,
          fmt: Annotated[KeysFormat | None, typer.Option(
              "--format", help="With --keys: table (a terminal's default), text (one whole line per key: the "
                               "default in a log or a pipe), md (docs/keys.md) or json.")] = None,
          ) -> None:
    """Validate a recipe and print every problem at once (or, with --keys, document every key)."""
    from amp_deploy.pipeline.preflight import preflight
    from amp_deploy.recipe import key_docs, keys_markdown, recipe_document, recipe_problems

    if keys:
        fmt = fmt or (KeysFormat.table if out.is_terminal else KeysFormat.text)
        rows = key_docs()
        if fmt is KeysFormat.json:
            out.print_json(data=[{"key": k, "default": d, "meaning": m} for k, d, m in rows])
        elif fmt is KeysFormat.md:
            print(keys_markdown(), end="")
        elif fmt is KeysFormat.text:  # never drawn to a width: every key whole on its line
            for k, d, m in rows:
                print(f"{k}" + (f" = {d}" if d else "") + (f"  # {m}" if m else ""))
        else:
            table = Table(title="recipe keys")
            for col in ("key", "default", "meaning"):
                table.add_column(col, overflow="fold")
            for row in rows:
                table.add_row(*row)
            out.print(table)
        return
    if fmt is not None:
        raise UserError("check: --format goes with --keys")
    if recipe is None:
        raise UserError("check: give a recipe file (or --keys)")
    doc = recipe_document(recipe, overrides or [])
    parsed, problems = recipe_problems(doc)
    if parsed is not None:
        try:
            preflight(parsed)  # what the schema cannot see: model names, weights files, image counts
        except UserError as e:
            problems.append(str(e))
        try:
            _print_plan(parsed)  # the plan needs the model section only: printed beside other problems too
        except UserError as e:
            problems.append(str(e))
    if problems:
        for p in problems:
            err.print(f"{recipe}: {p}", soft_wrap=True, markup=False)
        raise typer.Exit(2)
    out.print(f"{recipe}: ok")


def _print_plan(recipe) -> None:
    """The memory plan of every stage, for the recipe's machine section (or this machine); a UserError
    where a stage does not fit."""
    from amp_deploy.pipeline.memory import UNKNOWN_CAPACITY, device_memory, plan_rows, recipe_plan, refuse_unfit

    m = recipe.machine
    device, procs = (m.device, m.processes) if m else ("cpu", 1)
    cap = int(m.memory_gib * 2**30) if m else device_memory("cpu")
    plans = recipe_plan(recipe, device, procs, capacity=cap)
    where = (f"{procs} x {m.memory_gib:g} GiB {device} (the recipe's machine section)" if m
             else f"this machine's CPU, {cap / 2**30:.1f} GiB available" if cap
             else "this machine's CPU, its available memory unknown")
    table = Table(title=f"memory plan: peak per device, {where}")
    for col in ("stage", "device", "peak", "terms", "note"):
        table.add_column(col, overflow="fold")
    for row in plan_rows(plans):
        table.add_row(*row)
    _log_console().print(table)
    if not cap:
        _log_console().print(f"memory plan: not judged: {UNKNOWN_CAPACITY}; a machine section (machine.memory_gib) "
                             "judges it against the machine you name", soft_wrap=True)
    refuse_unfit(plans, {device: cap} if cap else {}, procs)


@app.command()
@_handled
def inspect(path: Annotated[Path, typer.Argument(help="A pruned.safetensors or an output folder.")]) -> None:
    """Show widths, parameters and FLOPs of a pruned checkpoint or an output folder."""
    from amp_deploy.checkpoint import load_pruned_model, read_metadata
    from amp_deploy.measure.metrics import count_flops
    from amp_deploy.prune.families import count_params

    ckpt = path / "pruned.safetensors" if path.is_dir() else path
    meta = read_metadata(ckpt)
    loaded = load_pruned_model(ckpt)  # checks the metadata's shapes against the base model
    from amp_deploy.prune.shape import recorded_shapes

    shapes, original = recorded_shapes(meta)
    original = original or shapes  # not recorded (saved outside a build)
    heads = any(s.heads is not None for s in shapes)
    table = Table(title=f"{ckpt}")
    for col in ("block", "original width", "pruned width", "kept", *(("heads",) if heads else ())):
        table.add_column(col, justify="right")
    for i, (a, b) in enumerate(zip(original, shapes)):
        cell = () if not heads else (f"{b.heads} of {a.heads}" if a.heads is not None else str(b.heads),)
        table.add_row(str(i), str(a.width), str(b.width), f"{b.width / a.width:.0%}", *cell)
    out.print(table)
    out.print(f"model: {json.loads(meta['base'])['name']}  parameters: {count_params(loaded.model):,}  "
              f"FLOPs/image: {count_flops(loaded.model, loaded.input_size):,}")


class Backend(str, Enum):
    onnxruntime = "onnxruntime"
    tensorrt = "tensorrt"
    openvino = "openvino"
    openvino_int8 = "openvino-int8"


@app.command()
@_handled
def triton(folder: Annotated[Path, typer.Argument(help="Output folder of a build.")],
           repo: Annotated[Path, typer.Option("--repo", help="Triton model repository to write into.")],
           name: Annotated[str | None, typer.Option(help="Model name in the repository (default: the recipe's name).")] = None,
           backend: Annotated[Backend, typer.Option(help="onnxruntime (pruned.onnx), tensorrt (pruned.plan), openvino "
                                                        "(pruned.xml) or openvino-int8 (pruned.openvino-int8.xml).")] = Backend.onnxruntime,
           original: Annotated[bool, typer.Option("--original", help="Serve the original model instead of the pruned one.")] = False) -> None:
    """Write a Triton Inference Server model repository entry for a build."""
    from amp_deploy.pipeline.serving import triton_entry

    path = triton_entry(folder, repo, name, backend.value, "original" if original else "pruned")
    out.print(f"wrote {path} (config.pbtxt, 1/)")


class Format(str, Enum):
    table = "table"
    md = "md"
    json = "json"


@app.command("compare")
@_handled
def compare_cmd(reports: Annotated[list[Path], typer.Argument(help="report.json files or output folders; the first is the baseline.")],
                fail_on_regression: Annotated[float | None, typer.Option(
                    "--fail-on-regression", metavar="PCT", help="Exit 1 when a pruned model's 95% interval of the change lies wholly above PCT percent "
                         "slower than the baseline's, 0 when every one lies wholly below, 3 when the rounds timed "
                         "cannot tell (it says how many would).")] = None,
                fmt: Annotated[Format, typer.Option("--format", help="table, md (for a pull request) or json.")] = Format.table) -> None:
    """Compare reports side by side: latency per runtime and batch size, size, widths, fidelity."""
    from amp_deploy.measure.compare import compare, gate_threshold, load_report, render_md

    gate_threshold(fail_on_regression)
    cmp = compare([load_report(p) for p in reports], fail_on_regression)
    if fmt is Format.json:
        out.print_json(data=cmp)
    elif fmt is Format.md:
        out.print(render_md(cmp), markup=False, soft_wrap=True)
    else:
        _compare_table(cmp)
    if cmp["regressions"]:
        raise GateFailed(f"{len(cmp['regressions'])} regression(s) over {fail_on_regression:g}%: "
                         + "; ".join(cmp["regressions"]))
    if cmp["undecided"]:
        raise GateUndecided(f"the regression gate could not judge {len(cmp['undecided'])} row(s): "
                            + "; ".join(cmp["undecided"]))


def _log_console() -> Console:
    """stdout, as wide as a table needs when it is no terminal (a CI log): Rich would draw 80 columns
    and cut every cell."""
    if out.is_terminal:
        return out
    return Console(highlight=False, width=240)


def _compare_table(cmp: dict) -> None:
    out = _log_console()
    s = Table(title="reports")
    for col in ("report", "params", "FLOPs", "accuracy %", "cosine mean", "path"):  # fold, never cut with "…"
        s.add_column(col, justify="left" if col in ("report", "path") else "right", overflow="fold")
    for label, r in cmp["summary"].items():
        acc = "n/a" if r["accuracy"] is None else f"{r['accuracy']:.2f}"
        s.add_row(label, f"{r['params']:,}", f"{r['flops']:,}", acc, f"{r['cosine_mean']:.5f}", escape(r["path"]))
    out.print(s)
    t = Table(title="latency vs A (ms)")
    from amp_deploy.measure.compare import ci_text

    for col in ("vs A", "runtime", "model", "batch", "p50 A", "p50", "change", "95% CI", "p99 A", "p99", "img/s change"):
        t.add_column(col, justify="left" if col in ("vs A", "runtime", "model") else "right", overflow="fold")
    for r in cmp["rows"]:
        color = "red" if r["p50_change_pct"] > 0 else "green"
        t.add_row(r["report"], r["runtime"], r["model"], str(r["batch"]), f"{r['p50'][0]:.3f}", f"{r['p50'][1]:.3f}",
                  f"[{color}]{r['p50_change_pct']:+.1f}%[/{color}]", ci_text(r), f"{r['p99'][0]:.3f}",
                  f"{r['p99'][1]:.3f}", f"{r['throughput_change_pct']:+.1f}%")
    out.print(t)
    for w in cmp["warnings"]:
        err.print(f"[yellow]warning:[/yellow] {escape(w)}", soft_wrap=True)
    for u in cmp["undecided"]:
        err.print(f"[yellow]could not judge:[/yellow] {escape(u)}", soft_wrap=True)


def _summary(report_path: Path) -> None:
    from amp_deploy.measure.report import heads_cut

    rep = json.loads(report_path.read_text())
    t = Table(title=f"{rep['name']}: original vs pruned")
    for col, just in (("", "left"), ("original", "right"), ("pruned", "right"), ("ratio", "right")):
        t.add_column(col, justify=just)
    p, f, fi = rep["params"], rep["flops"], rep["fidelity"]
    t.add_row("parameters", f"{p['original']:,}", f"{p['pruned']:,}", f"{p['ratio']:.3f}")
    t.add_row("FLOPs / image", f"{f['original']:,}", f"{f['pruned']:,}", f"{f['ratio']:.3f}")
    if heads_cut(rep):
        h = rep["heads"]
        t.add_row("attention heads", f"{sum(h['original'])}", f"{sum(h['pruned'])}",
                  f"{sum(h['pruned']) / sum(h['original']):.3f}")
    if fi.get("accuracy_original") is not None:
        if fi.get("before_distill"):
            t.add_row("holdout top-1 % (before distill)", f"{fi['accuracy_original']:.2f}",
                      f"{fi['before_distill']['accuracy_pruned']:.2f}", "")
        t.add_row("holdout top-1 %", f"{fi['accuracy_original']:.2f}", f"{fi['accuracy_pruned']:.2f}", "")
    if (kn := fi.get("knn_top1")) and kn.get("original") is not None:
        t.add_row(f"k-NN top-1 % (k={kn.get('k')})", f"{kn['original']:.2f}", f"{kn['pruned']:.2f}", "")
    if (zs := fi.get("zero_shot_top1")) and zs.get("original") is not None:
        t.add_row("zero-shot top-1 %", f"{zs['original']:.2f}", f"{zs['pruned']:.2f}", "")
    if fi.get("cosine_mean") is not None:
        t.add_row("output cosine to the original", "", f"{fi['cosine_mean']:.4f} (min {fi['cosine_min']:.4f})", "")
    notes = []
    for name, row in rep["runtimes"].items():
        if row["status"] != "ok":
            notes.append(f"{name}: {row['status']}: {row.get('reason', '')}")
            continue
        if row.get("parity"):
            t.add_row(f"{name} parity max err", f"{row['parity']['original']['max_abs_err']:.1e}",
                      f"{row['parity']['pruned']['max_abs_err']:.1e}", "")
        for b, o in row["latency_ms"]["original"].items():
            q = row["latency_ms"]["pruned"][b]
            t.add_row(f"{name} p50 ms, b={b}", f"{o['p50']:.3f}", f"{q['p50']:.3f}", f"{o['p50'] / q['p50']:.2f}x")
    out.print(t)
    if lb := rep.get("latency_budget"):
        v = lb.get("validate", {})
        seen = f"{v['measured_speedup']:.3f}x" if v.get("status") == "ok" else f"{v.get('status')} ({v.get('reason')})"
        over = " over the fp32 original" if lb.get("baseline") == "fp32" else ""
        out.print(f"latency budget: {lb['target_speedup']:.3f}x asked{over} on {lb['runtime']} {lb['precision']} at batch "
                  f"{lb['batch']}: predicted {lb['predicted_speedup']:.3f}x, search's check {lb['measured_speedup']:.3f}x, "
                  f"validate {seen}", soft_wrap=True)
    for n in notes:
        out.print(n, soft_wrap=True)
    out.print(f"report: {report_path.with_suffix('.md')}  (and {report_path.name})")


def run() -> None:  # console-script entry point
    app()


if __name__ == "__main__":
    sys.exit(app())
