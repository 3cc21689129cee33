"""qpipe: one command per pipeline stage, plus doctor and setup-converter.

Stage commands read params.yaml and recipes/ from the current directory (the project root,
where dvc.yaml calls them). Errors print one line (what | where | fix) and exit with the
code of their type: 2 bad input, 3 something this host lacks, 1 a gate failed, 4 a tool
failed unexpectedly (QPIPE_DEBUG=1 shows its traceback).
"""

from __future__ import annotations

import functools
import sys
import time
from pathlib import Path
from typing import Callable

import typer

app = typer.Typer(
    name="qpipe",
    help="Build, gate and compare quantized LLM artifacts. `dvc repro` runs the stages in order.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def log(message: str) -> None:
    typer.echo(message, err=True)


def stage(function: Callable) -> Callable:
    """Turn qpipe errors into one line on stderr and their exit code."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        import os

        from pipeline.errors import DEBUG_ENV, QpipeError, from_unexpected

        try:
            from pipeline.ci import refuse_to_run

            refuse_to_run(function.__name__.removesuffix("_command"))
            return function(*args, **kwargs)
        except QpipeError as error:
            typer.echo(error.one_line(), err=True)
            raise typer.Exit(error.exit_code) from None
        except KeyboardInterrupt:
            typer.echo("interrupted: nothing was left half-written", err=True)
            raise typer.Exit(130) from None
        except typer.Exit:
            raise
        except Exception as error:
            if os.environ.get(DEBUG_ENV) == "1":
                raise
            command = function.__name__.removesuffix("_command").replace("_", "-")
            described = from_unexpected(error, f"qpipe {command}")
            typer.echo(described.one_line(), err=True)
            raise typer.Exit(described.exit_code) from None

    return wrapper


def _params():
    from pipeline.config import load_params

    return load_params()


def _threads(params) -> int:
    from pipeline import host

    return host.worker_threads(params.speed.threads)


@app.command("host")
@stage
def host_command(remeasure: bool = typer.Option(False, help="measure the bandwidth again even if the host is unchanged")):
    """Probe this machine -> artifacts/host.json (CPU, memory, bandwidth, GPU, runtimes)."""
    from pipeline import host, layout
    from pipeline.files import read_json, write_json
    from pipeline.gates.speed import HostLock

    previous = read_json(layout.HOST_FILE) if layout.HOST_FILE.is_file() else None
    with HostLock():  # the bandwidth is a measurement like a speed gate's
        info = host.probe(previous, remeasure=remeasure)
    write_json(layout.HOST_FILE, info)
    log(f"host: {info['cpu']['model']}, {info['cpu']['physical_cores']} cores, "
        f"{info['bandwidth']['gb_s']} GB/s copy bandwidth, GPU: {info['gpus'][0]['name'] if info['gpus'] else 'none'}")


@app.command("source")
@stage
def source_command():
    """Resolve params `model.source` -> artifacts/source/ (HF checkpoint + source.json)."""
    from pipeline import layout, source

    params = _params()
    info = source.run(params.model.source, params.model.revision, layout.SOURCE_DIR, log=log)
    log(f"source: {info['architectures']}, {info['bytes'] / 1e6:.1f} MB in {len(info['files'])} files")


@app.command("corpus")
@stage
def corpus_command():
    """Params `corpus` -> artifacts/corpus/ (calibration.txt, evaluation.txt, disjoint)."""
    from pipeline import corpus, layout

    corpus.run(_params().corpus, layout.CORPUS_DIR, log=log)


@app.command("reference")
@stage
def reference_command():
    """Evaluation windows + the unquantized model's scores -> artifacts/reference/."""
    from pipeline import layout, reference
    from pipeline.gates.speed import heavy_work

    with heavy_work():
        reference.run(_params().reference, layout.SOURCE_DIR, layout.EVALUATION_TEXT, layout.REFERENCE_DIR, log=log)


@app.command("sensitivity")
@stage
def sensitivity_command():
    """Each tensor group's damage at each candidate type, for searched recipes -> artifacts/sensitivity/."""
    from pipeline import layout, sensitivity
    from pipeline.gates.speed import heavy_work

    params = _params()
    with heavy_work():
        sensitivity.run(params.sensitivity, layout.SOURCE_DIR, layout.CALIBRATION_TEXT, layout.SENSITIVITY_DIR,
                        threads=_threads(params), log=log)


@app.command("recipe")
@stage
def recipe_command(recipe: str = typer.Argument(..., help="recipe name (recipes/NAME.yaml)")):
    """Validate one recipe -> artifacts/recipes/RECIPE.json (its build knobs only) and
    RECIPE.engine.json (its engine settings)."""
    from pipeline import builds

    builds.write_build_spec(recipe)


@app.command("build")
@stage
def build_command(recipe: str = typer.Argument(..., help="recipe name (recipes/NAME.yaml)")):
    """Build the artifact of one recipe -> artifacts/builds/RECIPE/."""
    from pipeline import builds
    from pipeline.gates.speed import heavy_work

    with heavy_work():  # never while a speed measurement runs on this host
        builds.run_build(recipe, threads=_threads(_params()), log=log)


@app.command("engine")
@stage
def engine_command(recipe: str = typer.Argument(..., help="recipe name (recipes/NAME.yaml)")):
    """The engine step of a recipe whose format has one (modelopt: a TensorRT engine) -> artifacts/engines/RECIPE/."""
    from pipeline import engines

    engines.run_engine(recipe, log=log)


@app.command("baseline")
@stage
def baseline_command():
    """Unquantized speed of each format `recipes` uses, on this host -> artifacts/baselines/ (for decode_speedup)."""
    from pipeline import baselines

    baselines.run_baselines(_params().speed, log=log)


@app.command("formats")
@stage
def formats_command():
    """The formats `recipes` uses -> artifacts/formats.json (what the baseline stage measures)."""
    from pipeline import baselines

    used = baselines.write_formats_used(_params().recipes)
    log(f"formats: {', '.join(used) or '(none)'}")


@app.command("task-base")
@stage
def task_base_command():
    """The unquantized model's scores on params `tasks` (lm-eval) -> artifacts/tasks/base.json."""
    from pipeline.gates import speed, tasks

    params = _params()
    with speed.heavy_work():
        tasks.run_base(params, threads=_threads(params), log=log)


@app.command("gate")
@stage
def gate_command(recipe: str = typer.Argument(..., help="recipe name (recipes/NAME.yaml)")):
    """Accuracy, speed and task gates of one artifact -> artifacts/gates/RECIPE.json."""
    from pipeline.gates import run_gate

    run_gate(recipe, params=_params(), log=log)


@app.command("report")
@stage
def report_command():
    """Tradeoff table, Pareto front and plot over params `recipes` -> artifacts/report/."""
    from pipeline import layout, report

    params = _params()
    rows = report.run(params, layout.REPORT_DIR, log=log)
    typer.echo((layout.REPORT_DIR / "tradeoff.md").read_text() if rows else "no recipes")


@app.command("check")
@stage
def check_command(allow_not_judged: bool = typer.Option(
        False, "--allow-not-judged", help="exit 0 although a relative limit could not be judged (its recipe is "
                                          "still listed `not judged`, never `pass`)")):
    """Exit 1 naming every recipe whose verdict is not pass (fail, a required gate not run, a
    relative limit not judged) or whose gate result is stale (judged against other params or
    limits than now), judged from the gate results themselves."""
    from pipeline import layout
    from pipeline.errors import GateFailed
    from pipeline.gates import load_results
    from pipeline.gates.stale import FIX, stale_results
    from pipeline.limits import notes

    params = _params()
    results = load_results(params.recipes)
    stale = stale_results(results, params)
    failed = []
    for result in results:
        name = result["recipe"]
        for note in notes(result):
            log(f"      {name}: limit {note}")
        if name in stale:
            failed.append(name)
            log(f"STALE {name} (verdict {result['verdict']} under what it was judged against): {stale[name]}")
        elif result["verdict"] == "pass":
            log(f"pass  {name}")
        else:
            if not (allow_not_judged and result["verdict"] == "not_judged"):
                failed.append(name)
            log(f"{result['verdict'].upper().replace('_', ' '):<5} {name}: {'; '.join(result['reasons'])}")
    if failed:
        raise GateFailed(f"{len(failed)} of {len(params.recipes)} artifacts did not pass"
                         + (f" ({len(stale)} stale)" if stale else "") + f": {', '.join(failed)}",
                         where=str(layout.GATES_DIR), fix=FIX if len(stale) == len(failed) else
                         "see the reasons above; raise a limit only with a reason" + (f"; {FIX}" if stale else ""))


@app.command("compare")
@stage
def compare_command(
    sort: str = typer.Option("mean_kld", help="column to sort by"),
    descending: bool = typer.Option(False, "--descending", help="largest first"),
    output: str = typer.Option("md", "--format", help="md | csv | json"),
    workspace_only: bool = typer.Option(False, "--workspace-only", help="skip `dvc exp` experiments"),
    against: str = typer.Option(None, "--against", help="a git revision: each recipe's change against the "
                                                       "gate results recorded there (md | json), for a pull request"),
):
    """Every artifact of the workspace and of `dvc exp` experiments in one table, Pareto front marked;
    with --against REV, each recipe's change against that revision."""
    from pipeline import compare

    if against:
        from pipeline import changes

        typer.echo(changes.against(against, output, log=log), nl=False)
        return
    rows = compare.sort_rows(compare.load_rows(workspace_only, log=log), sort, descending)
    typer.echo(compare.render(rows, output), nl=False)


@app.command("recommend")
@stage
def recommend_command(
    max_size: str = typer.Option(None, help="largest artifact, e.g. 120MB or 1.5GiB"),
    max_kld: float = typer.Option(None, help="largest mean KLD"),
    max_ppl_ratio: float = typer.Option(None, help="largest ppl ratio"),
    min_top1: float = typer.Option(None, help="smallest top-1 agreement"),
    min_decode: float = typer.Option(None, help="smallest decode tok/s"),
    min_recovery: float = typer.Option(None, help="smallest task recovery (the lowest over params `tasks`)"),
    objective: str = typer.Option("decode", help="decode | prefill | kld | ppl | top1 | recovery | size"),
    workspace_only: bool = typer.Option(False, "--workspace-only", help="skip `dvc exp` experiments"),
):
    """The best passing artifact under the constraints, and why each other one lost."""
    from pipeline import compare

    constraints = compare.constraints({"--max-size": max_size, "--max-kld": max_kld,
                                       "--max-ppl-ratio": max_ppl_ratio, "--min-top1": min_top1,
                                       "--min-decode": min_decode, "--min-recovery": min_recovery})
    choice = compare.recommend(compare.load_rows(workspace_only, log=log), constraints, objective)
    typer.echo(compare.explain(choice), nl=False)


@app.command("publish")
@stage
def publish_command(
    to: str = typer.Option(..., "--to", help="dir://PATH | oci://HOST[:PORT]/REPOSITORY | hf://ORG/NAME"),
    include_failed: bool = typer.Option(False, "--include-failed", help="also publish artifacts that did not pass"),
    gto_tag: bool = typer.Option(False, "--gto-tag", help="tag each new registry version RECIPE@vX.Y.Z at HEAD (GTO)"),
):
    """Publish every artifact whose verdict is pass, with model card, SHA256SUMS and provenance."""
    from pipeline import publish

    published = publish.run(to, _params().recipes, include_failed=include_failed, log=log)
    for entry in published:
        typer.echo(f"{entry['recipe']}\t{entry['version']}\t{'pushed' if entry['pushed'] else 'unchanged'}\t"
                   f"{entry['location']}")
    if gto_tag:
        from pipeline import versions

        versions.register(published, log=log)


@app.command("doctor")
@stage
def doctor_command(checkpoint: Path = typer.Option(None, "--checkpoint", help="a Hugging Face checkpoint "
                                                    "directory: whether each stage of params.yaml's recipes fits this "
                                                    "host, from its config alone (exit 3 when one does not)")):
    """What this host can build and gate: CPU, GPU, memory bandwidth, runtimes, tools."""
    from pipeline import formats, host
    from pipeline.gates import tasks

    if checkpoint is not None:
        fits = checkpoint_lines(checkpoint, _params())
        for line in fits:
            typer.echo(line)
        if any(line.endswith("does not fit") for line in fits):
            raise typer.Exit(3)
        return
    started = time.perf_counter()
    cpu = host.cpu_info()
    gpus = host.gpus()
    runtimes = host.runtimes()
    bandwidth = host.measure_bandwidth_gb_s(total_mib=128, repeats=3, threads=cpu["logical_cores"])
    typer.echo(f"CPU        {cpu['model']}: {cpu['physical_cores']} cores / {cpu['logical_cores']} threads, "
               f"SIMD {' '.join(cpu['simd']) or 'none detected'}")
    typer.echo(f"memory     {host.memory_gb()} GB, copy bandwidth ~{bandwidth} GB/s (quick estimate; "
               "the host stage measures 1 GiB)")
    typer.echo("GPU        " + ("; ".join(f"{g['name']} {g['memory_gb']} GB, CC {g['compute_capability']}, "
                                       f"driver {g['driver']}" for g in gpus) or "none (no nvidia-smi or no device)"))
    typer.echo("runtimes   " + ", ".join(f"{name} {version or '-'}" for name, version in runtimes.items()))
    for line in format_lines(formats.FORMATS):
        typer.echo(line)
    lm_eval = host.package_version("lm-eval")
    typer.echo("tasks      " + (f"lm-eval {lm_eval}: task gates for params `tasks` (docs/tasks.md)" if lm_eval else
                                f"lm-eval is not installed: pip install 'qpipe[{tasks.EXTRA}]' for params `tasks`"))
    typer.echo("others     vllm / tensorrt_llm / modelopt / llmcompressor are listed above when installed "
               "(found by package metadata, not imported: importing them takes seconds)")
    typer.echo(f"({time.perf_counter() - started:.2f} s)")


def stage_needs(checkpoint: Path, params, *, device: str, gpu: bool | None = None) -> list:
    """(stage, ``memory.Need``) for each heavy stage of `params` on `checkpoint`, nothing loaded
    (its config and a meta-device model): the reference on `device` (and the sensitivity stage
    where it measures a format), then each recipe's build
    (on the GPU where it calibrates and `gpu`, None: this host has a usable one) and gate. A
    GGUF gate maps its artifact, counted here at the checkpoint's 16-bit size (no GGUF is
    larger), so its estimate is an upper bound until the build exists."""
    from pipeline import formats, memory, reference, sensitivity
    from pipeline.builds import build_memory_need
    from pipeline.gates import gate_memory_need

    size = memory.ModelSize.of(checkpoint)
    needs = [(f"reference ({params.reference.dtype})", reference.memory_need(params.reference, checkpoint, device))]
    if params.sensitivity.formats:
        needs.append((f"sensitivity ({params.sensitivity.dtype})",
                      sensitivity.memory_need(params.sensitivity, checkpoint, device)))
    for name in params.recipes:
        recipe = formats.load_recipe(name)
        info = formats.module(recipe.format).INFO
        needs.append((f"build {name}", build_memory_need(info, recipe, checkpoint, gpu=gpu)))
        needs.append((f"gate {name}", gate_memory_need(info, size, window_tokens=params.reference.window_tokens,
                                                        artifact_bytes=2 * size.parameters)))
    return needs


def checkpoint_lines(checkpoint: Path, params) -> list[str]:
    """Each heavy stage's memory estimate for `checkpoint` (``stage_needs``) against what this
    host has, and the disk the reference's log-probs take."""
    from pipeline import layout, memory, reference
    from pipeline.errors import BadInput
    from pipeline.runtimes.transformers import torch_device

    if not (checkpoint / "config.json").is_file():
        raise BadInput("no config.json in the checkpoint", where=str(checkpoint),
                       fix="give a Hugging Face checkpoint directory (config.json and safetensors)")
    size = memory.ModelSize.of(checkpoint)
    lines = [f"checkpoint {checkpoint}: {size.parameters / 1e9:.2f}B parameters, vocabulary {size.vocabulary}"]
    for stage, need in stage_needs(checkpoint, params, device=torch_device()):
        where, need_bytes = need.device, need.bytes
        have = memory.available_bytes(where)
        verdict = "fits" if have is None or need_bytes <= have else "does not fit"
        lines.append(f"{stage:<28} needs ~{need_bytes / 1e9:6.1f} GB of {'GPU 0' if where == 'cuda' else 'memory'}, "
                     f"{'unknown' if have is None else f'{have / 1e9:.1f} GB'} free: {verdict}")
    disk = reference.disk_need(params.reference, checkpoint)
    free = reference.free_disk_bytes(layout.REFERENCE_DIR)
    lines.append(f"{'reference log-probs':<28} needs  {disk / 1e9:6.1f} GB of disk, {free / 1e9:.1f} GB free: "
                 f"{'fits' if disk <= free else 'does not fit'}")
    return lines


def format_lines(names) -> list[str]:
    """doctor's lines on the formats' tools and what this host can build and gate, each
    format asked in its own terms (formats.contract)."""
    from pipeline import formats

    tools, gates, buildable, missing = [], [], [], []
    for name in names:
        fmt = formats.module(name)
        tools += [f"{label:<10} {text}" for label, text in getattr(fmt, "tools", dict)().items()]
        problem = fmt.build_unavailable_reason()
        (missing if problem else buildable).append((name, problem))
        accuracy = fmt.accuracy_unavailable_reason(None)
        speed = fmt.speed_unavailable_reason(None)
        if accuracy is not None:
            gates.append(f"can gate   {name}: nothing: {accuracy}")
        else:
            gates.append(f"can gate   {name} accuracy via {fmt.runtime_name(None)}"
                         + (", speed too" if speed is None else f"; speed not: {speed}"))
    build = f"can build  {', '.join(n for n, _ in buildable) or 'nothing'}" + "".join(
        f" ({name}: {problem})" for name, problem in missing)
    return [*tools, build, *gates]


@app.command("setup-converter")
@stage
def setup_converter_command():
    """Install llama.cpp's convert_hf_to_gguf.py matching the installed llama-cpp-python."""
    from pipeline.formats import gguf

    path = gguf.setup_converter()
    typer.echo(f"converter ready: {path}")


@app.command("add-recipe")
@stage
def add_recipe_command(
    name: str = typer.Argument(..., help="the recipe: recipes/NAME.yaml"),
    copy_of: str = typer.Option(None, "--from", help="write recipes/NAME.yaml first, as a copy of this recipe's file"),
    description: str = typer.Option(None, help="with --from: the copy's description"),
):
    """List recipes/NAME.yaml wherever it is not yet: params.yaml `recipes:`, dvc.yaml
    `artifacts:` and the CI workflows `qpipe ci init` wrote (docs/checkpoints.md)."""
    from pipeline import recipe_listing

    for path in recipe_listing.add(name, copy_of, description):
        log(f"wrote {path}")


limits_app = typer.Typer(help="Limits fitted to a run you trust (docs/checkpoints.md, limits for your model).",
                         no_args_is_help=True)
app.add_typer(limits_app, name="limits")


@limits_app.command("suggest")
@stage
def limits_suggest_command(
        margin: float = typer.Option(1.5, min=1.0, help="each limit this many times its figure's interval bound's "
                                                        "distance from lossless"),
        write: bool = typer.Option(False, "--write", help="write them into params.yaml `limits:` (each recipe's "
                                                          "entry replaced); else print them"),
):
    """The params `limits` that would guard the last run's artifacts (pipeline/limits.py: the rule)."""
    import datetime
    import subprocess

    import yaml

    from pipeline import limits as fitting
    from pipeline.config import PARAMS_FILE, Params, validate
    from pipeline.gates import load_results

    params = _params()
    fitted, skipped = fitting.suggest(load_results(params.recipes), margin)
    revision = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    suggested = (f"qpipe limits suggest --margin {margin:g}: the gate results of {revision or 'this tree'}, "
                 f"{datetime.date.today().isoformat()}")
    for reason in skipped:
        log(f"not suggested: {reason}")
    if not write:
        typer.echo(yaml.safe_dump({"limits": fitted}, sort_keys=False, width=120), nl=False)
        return
    text = fitting.with_limits(PARAMS_FILE.read_text(), fitted, suggested)
    validate(Params, yaml.safe_load(text), PARAMS_FILE)
    from pipeline.files import write_text

    write_text(PARAMS_FILE, text)
    log(f"wrote the limits of {len(fitted)} recipes into {PARAMS_FILE} `limits:`")


ci_app = typer.Typer(help="Run qpipe in a team's CI: one job per recipe, a shared DVC remote (docs/ci.md).",
                     no_args_is_help=True)
app.add_typer(ci_app, name="ci")


def _labels(text: str | None) -> list[str] | None:
    return None if text is None else [label.strip() for label in text.split(",") if label.strip()]


@ci_app.command("init")
@stage
def ci_init_command(
    platform: str = typer.Argument(..., help="github | gitlab"),
    cpu_labels: str = typer.Option(None, help="runner labels (GitHub runs-on, GitLab tags) for CPU jobs, comma-separated"),
    gpu_labels: str = typer.Option(None, help="runner labels for recipes whose format needs a GPU runtime"),
    force: bool = typer.Option(False, "--force", help="replace an existing workflow"),
    check: bool = typer.Option(False, "--check", help="write nothing; exit 2 if the written workflow's recipe "
                                                     "matrix, or dvc.yaml's artifacts, differ from params.yaml's "
                                                     "recipes"),
):
    """Write .github/workflows/qpipe.yml or .gitlab-ci.yml: a job per recipe of params.yaml."""
    from pathlib import Path

    from pipeline import ci, recipe_listing
    from pipeline.errors import BadInput

    recipes = _params().recipes
    if check:
        path = Path(ci.platform_module(platform).PATH)
        problem = ci.stale_reason(platform, path, ci.jobs(recipes))
        if problem:
            raise BadInput(f"the workflow is stale: {problem}", where=str(path),
                           fix=f"`qpipe ci init {platform} --force` and commit it")
        problems = recipe_listing.artifact_problems(recipes)
        if problems:
            raise BadInput("; ".join(problems), where=f"{ci.DVC_FILE}: {recipe_listing.ARTIFACTS_KEY}",
                           fix="`qpipe add-recipe NAME` writes a listed recipe's missing entry; correct or remove the "
                               "others, and commit dvc.yaml")
        log(f"{path} and {ci.DVC_FILE} list every recipe of params.yaml")
        return
    ci.init(platform, recipes, _labels(cpu_labels), _labels(gpu_labels), force, log=log)


@ci_app.command("gather")
@stage
def ci_gather_command(hosts: str = typer.Option("ci-hosts", help="folder of RECIPE.json: each runner's host.json")):
    """The report job: restore every recipe's stages from the run-cache under its runner's host.json."""
    from pathlib import Path

    from pipeline import ci

    ci.gather(_params().recipes, Path(hosts), log=log)


@ci_app.command("comment")
@stage
def ci_comment_command(against: str = typer.Option(None, "--against", help="the base revision to compare with")):
    """The pull-request comment (markdown on stdout): report table, changes against the base, plot."""
    from pipeline import ci

    typer.echo(ci.comment(against, log=log), nl=False)


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
