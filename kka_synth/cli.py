"""The ``kka-synth`` command. The only place that configures logging and draws progress bars."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kka_synth.config import (
    DATASETS,
    EVALUATORS,
    HF_PREFIX,
    MODES,
    PROFILES,
    PROPOSER_BACKENDS,
    RENDERER_NAMES,
    VARIANTS,
    ConfigError,
    RunConfig,
)

logger = logging.getLogger("kka_synth")

RUN_HELP = """\
Run the KKA loop: a proposer writes defect specs, renderers draw them on normal images, filters drop failed
renders, Deep SAD scores how hard (close to normal) each kept defect is, and DPO steers the proposer toward
hard ones. Each iteration's images, masks, candidates.parquet and stats.json land in OUT/NAME/iterations/K/;
the curated hard set lands in OUT/NAME/curated/ in MVTec AD layout.

examples:
  kka-synth run --dataset demo --iterations 3
  kka-synth run --dataset mvtec_ad --data-root ~/data/mvtec --category bottle --profile hub
  kka-synth run --dataset demo --name demo --resume          continue a killed run where it stopped

Settings come from the profile, then --config run.yaml, then the flags here (last wins).
"""


EVAL_HELP = """\
Train each detector on the run's normal training images plus each synthetic-set variant, then test it on the
dataset's real test split (real test anomalies are never trained on). Variants: none (normal images only),
rule (Perlin anomalies), kka (the run's curated set), two-stage (rule, then kka), reverse (kka, then rule).
Writes RUN_DIR/metrics.json, RUN_DIR/metrics.md and RUN_DIR/report.html; results already in RUN_DIR/eval are
reused, so an interrupted evaluation continues where it stopped.

examples:
  kka-synth eval runs/demo
  kka-synth eval runs/demo --variants rule,two-stage --seeds 3
"""


PUBLISH_HELP = """\
Publish a run as a Hugging Face dataset: image and mask columns with each defect's spec, hardness, iteration,
renderer and source image, one split per category (or iteration), and a dataset card with the provenance
(models, config, seeds, versions), the hard-share curve and the source images' licence. The token comes
from --token-env or huggingface_hub's login and is never written to the run, the logs or the card.

examples:
  kka-synth publish runs/demo --dry-run publish-preview      the exact files, nothing uploaded
  kka-synth publish runs/mvtec --repo-id me/mvtec-hard-defects --private
"""

CHAT_HELP = """\
Talk to the agent that writes defect specs: constrain them ("exclude stains", "only the top-left",
"size < 2%"), ask for proposals and rendered previews ("show me three"), approve the good ones, save the set,
which `kka-synth run --prompts FILE` then uses. LLM backends (openai, transformers) run a tool-calling agent;
the offline compact proposer cannot converse, so a rule-based intent parser maps requests onto the same tools.

examples:
  kka-synth chat --prompt "exclude stains on bottle and show me three"
  kka-synth chat --run runs/demo                    what the run found hardest, then refine
  kka-synth chat --proposer openai --base-url http://localhost:8000/v1 --proposer-model MODEL
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kka-synth",
        description="Hard, realistic synthetic defects for visual anomaly detection (the KKA loop).",
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="More log output (-v info, -vv debug)."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser(
        "run",
        help="Run the KKA loop on a dataset.",
        description=RUN_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument(
        "--dataset",
        type=_dataset,
        metavar="D",
        help=f"Dataset: {', '.join(DATASETS)}, or hf:ORG/NAME for a Hugging Face mirror (columns in "
        "data.hf_columns); demo is built in (default: demo).",
    )
    run.add_argument("--data-root", metavar="P", help="Folder that holds the dataset (not needed for demo).")
    run.add_argument(
        "--category",
        action="extend",
        nargs="+",
        metavar="C",
        help="Categories to use, e.g. --category bottle cable (default: all).",
    )
    run.add_argument("--iterations", type=int, metavar="N", help="KKA iterations (default: 3).")
    run.add_argument(
        "--proposals-per-iteration",
        type=int,
        metavar="N",
        help="Specs proposed per category per iteration (default: 64).",
    )
    run.add_argument(
        "--profile",
        choices=PROFILES,
        help="offline: CPU, compact local models, no downloads (default). hub: pretrained weights.",
    )
    run.add_argument(
        "--renderer",
        type=_renderer_mix,
        metavar="R[=W],..",
        help="Renderers among "
        + ", ".join(RENDERER_NAMES)
        + ": one name, a fallback order (inpaint,procedural) "
        "or a mix with weights (inpaint=0.7,procedural=0.3). Default: procedural (offline), inpaint (hub).",
    )
    run.add_argument(
        "--matcher", choices=("sift", "lightglue"), help="Keypoint matcher of the match-count band."
    )
    run.add_argument(
        "--evaluator",
        choices=EVALUATORS,
        help="Confusion evaluator: a small CNN trained from scratch (offline default) or a Deep SAD head on "
        "frozen DINOv2 features (hub default).",
    )
    _proposer_flags(run)
    run.add_argument(
        "--prompts",
        metavar="FILE",
        help="Prompt set saved by `kka-synth chat`: constraints and approved examples per category.",
    )
    run.add_argument("--mode", choices=MODES, help="Curation: add = union of hard sets, rep = last hard set.")
    run.add_argument("--out", metavar="DIR", help="Folder for run directories (default: runs).")
    run.add_argument("--name", help="Run name, the folder under --out (default: the dataset name).")
    run.add_argument("--seed", type=int, metavar="S", help="Seed of every random choice (default: 0).")
    run.add_argument("--no-dpo", action="store_true", help="Skip DPO rounds (the no-DPO control).")
    run.add_argument("--resume", action="store_true", help="Continue OUT/NAME from its last finished stage.")
    run.add_argument("--config", metavar="run.yaml", help="A YAML file of RunConfig fields.")
    run.add_argument("--no-progress", action="store_true", help="No progress bars.")
    _trust_flag(run)

    chat = commands.add_parser(
        "chat",
        help="Talk to the agent: refine the defect prompt set, preview renders, save it for `run --prompts`.",
        description=CHAT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    chat.add_argument(
        "--run", metavar="RUN_DIR", help="A run directory: its settings, stats and hardest examples."
    )
    chat.add_argument("--prompt", metavar="TEXT", help="Say one thing, print the answer and exit (no REPL).")
    chat.add_argument(
        "--prompts",
        metavar="FILE",
        default="prompts.yaml",
        help="Prompt set to load (when it exists) and save to (default: prompts.yaml).",
    )
    chat.add_argument(
        "--preview-dir", metavar="DIR", help="Where previews go (default: RUN_DIR/previews or previews)."
    )
    chat.add_argument(
        "--dataset", type=_dataset, metavar="D", help="Dataset when no --run is given (default: demo)."
    )
    chat.add_argument("--data-root", metavar="P", help="Folder that holds the dataset (not needed for demo).")
    chat.add_argument("--profile", choices=PROFILES, help="offline (default) or hub, when no --run is given.")
    chat.add_argument("--config", metavar="run.yaml", help="A YAML file of RunConfig fields.")
    _proposer_flags(chat)
    _trust_flag(chat)

    publish = commands.add_parser(
        "publish",
        help="Publish a run as a Hugging Face dataset with a dataset card (or --dry-run to a folder).",
        description=PUBLISH_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    publish.add_argument("run_dir", metavar="RUN_DIR", help="A run directory written by `kka-synth run`.")
    publish.add_argument("--repo-id", metavar="USER/NAME", help="Dataset repository on the Hub.")
    publish.add_argument("--private", action="store_true", help="Create the repository private.")
    publish.add_argument(
        "--include",
        choices=("curated", "all"),
        default="curated",
        help="curated: the curated hard set (default); all: every kept candidate, hard and easy.",
    )
    publish.add_argument(
        "--split-by", choices=("category", "iteration"), default="category", help="One split per ... ."
    )
    publish.add_argument(
        "--token-env",
        metavar="VAR",
        default="HF_TOKEN",
        help="Environment variable with the Hub token (else huggingface_hub's login); never written.",
    )
    publish.add_argument(
        "--dry-run",
        metavar="DIR",
        help="Write the exact files that would be uploaded to DIR; upload nothing.",
    )
    publish.add_argument("--license", metavar="ID", help="Licence id for the card (default: the dataset's).")
    publish.add_argument("--no-progress", action="store_true", help="No progress bars.")

    export = commands.add_parser(
        "export",
        help="Write a run's synthetic defects in a layout other tools read (anomalib's Folder/MVTec).",
    )
    export.add_argument("run_dir", metavar="RUN_DIR", help="A run directory written by `kka-synth run`.")
    export.add_argument("out_dir", metavar="DIR", help="New or empty folder to write.")
    export.add_argument("--format", choices=("mvtec",), default="mvtec", help="Layout (default: mvtec).")
    export.add_argument(
        "--include",
        choices=("curated", "all"),
        default="curated",
        help="curated: the curated hard set (default); all: every kept candidate.",
    )

    evaluate = commands.add_parser(
        "eval",
        help="Train detectors on each synthetic-set variant of a run and test them on the real test split.",
        description=EVAL_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    evaluate.add_argument("run_dir", metavar="RUN_DIR", help="A run directory written by `kka-synth run`.")
    evaluate.add_argument(
        "--detectors", type=_names, metavar="D,..", help="Comma-separated detectors (default: draem)."
    )
    evaluate.add_argument(
        "--variants",
        type=_names,
        metavar="V,..",
        help=f"Comma-separated variants among {','.join(VARIANTS)} (default: all).",
    )
    evaluate.add_argument(
        "--seeds", type=int, metavar="N", help="Seeds per detector and variant (default: 1)."
    )
    evaluate.add_argument(
        "--image-size", type=int, metavar="PX", help="Side detectors work at (default: run's)."
    )
    evaluate.add_argument("--no-progress", action="store_true", help="No progress bars.")
    _trust_flag(evaluate)
    return parser


def _trust_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="Let Hub models run their own Python code (off by default; only for models you trust).",
    )


def _proposer_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--proposer",
        choices=PROPOSER_BACKENDS,
        help="Proposer backend (default: compact offline, transformers on the hub profile).",
    )
    parser.add_argument(
        "--proposer-model", metavar="ID", help="Hub id, local path or endpoint model name of the proposer."
    )
    parser.add_argument(
        "--base-url", metavar="URL", help="OpenAI-compatible endpoint, e.g. http://localhost:8000/v1."
    )


def _dataset(text: str) -> str:
    if text in DATASETS or (text.startswith(HF_PREFIX) and len(text) > len(HF_PREFIX)):
        return text
    raise argparse.ArgumentTypeError(f"expected one of {', '.join(DATASETS)} or hf:ORG/NAME, got {text!r}")


def _names(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected comma-separated names")
    return names


def _renderer_mix(text: str) -> tuple[list[str], list[float] | None]:
    """``inpaint`` / ``inpaint,procedural`` / ``inpaint=0.7,procedural=0.3`` -> (names, weights or None)."""
    names, weights = [], []
    for part in _names(text):
        name, _, weight = part.partition("=")
        name = name.strip()
        if name not in RENDERER_NAMES:
            raise argparse.ArgumentTypeError(
                f"unknown renderer {name!r} (known: {', '.join(RENDERER_NAMES)})"
            )
        try:
            weights.append(float(weight) if weight else None)
        except ValueError:
            raise argparse.ArgumentTypeError(f"weight of {name} must be a number, got {weight!r}") from None
        names.append(name)
    given = [w for w in weights if w is not None]
    if given and len(given) != len(weights):
        raise argparse.ArgumentTypeError("give a weight to every renderer of a mix, or to none")
    return names, (given or None)


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """Profile defaults, then the config file, then the flags (see :func:`kka_synth.api.make_config`)."""
    from kka_synth.api import make_config

    flags: dict[str, Any] = {}
    if args.profile:
        flags["profile"] = args.profile
    section: dict[str, Any] = {}
    if args.dataset:
        section["dataset"] = args.dataset
    if args.data_root:
        section["root"] = args.data_root
    if getattr(args, "category", None):
        section["categories"] = args.category
    if section:
        flags["data"] = section
    for flag, key in (
        ("iterations", "iterations"),
        ("proposals_per_iteration", "proposals_per_iteration"),
        ("mode", "mode"),
        ("out", "out"),
        ("seed", "seed"),
        ("name", "name"),
    ):
        if getattr(args, flag, None) is not None:
            flags[key] = getattr(args, flag)
    flags.update(_proposer_overrides(args))
    if getattr(args, "prompts", None) is not None and args.command == "run":
        flags["prompts"] = args.prompts
    if getattr(args, "no_dpo", False):
        flags["alignment"] = {"enabled": False}
    if getattr(args, "renderer", None) is not None:
        flags["render"] = {"renderers": args.renderer[0], "weights": args.renderer[1]}
    if getattr(args, "matcher", None) is not None:
        flags["filters"] = {"matcher": args.matcher}
    if getattr(args, "evaluator", None) is not None:
        flags["evaluator"] = {"name": args.evaluator}
    return make_config(args.config, **flags)


def _progress_bars(enabled: bool):  # noqa: ANN202 - returns a context manager and a callback
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bars = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        disable=not enabled,
        transient=False,
    )
    tasks: dict[str, int] = {}

    def update(task: str, done: int, total: int) -> None:
        if task not in tasks:
            tasks[task] = bars.add_task(task, total=total)
        bars.update(tasks[task], completed=done, total=total)

    return bars, update


def _summary(stats: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="KKA iterations")
    for column in (
        "iter",
        "proposals",
        "parse fail",
        "retries",
        "render fail",
        "filtered",
        "kept",
        "hard share",
        "hard (judge)",
        "median hardness",
        "distinct-2",
        "distinct specs",
        "DPO margin",
        "seconds",
    ):
        table.add_column(column, justify="right")

    def fmt(value: Any, spec: str = ".2f") -> str:
        return "-" if value is None else format(value, spec)

    for s in stats:
        dpo = s["dpo"]
        margin = (
            "-"
            if dpo.get("margin_after") is None
            else f"{dpo['margin_before']:.2f}→{dpo['margin_after']:.2f}"
        )
        table.add_row(
            str(s["iteration"]),
            str(s["proposals"]),
            str(s["parse_failures"]),
            str(s.get("parse_retries", 0)),
            str(s["render_failures"]),
            str(s["filtered"]),
            str(s["kept"]),
            fmt(s["hard_share"]),
            fmt(s["hard_share_judge"]),
            fmt(s.get("median_hardness")),
            fmt(s["distinct_2"]),
            str(s["distinct_specs"]),
            margin,
            f"{sum(s['seconds'].values()):.0f}",
        )
    console = Console()
    if not console.is_terminal:
        console.width = 160  # a log file or pipe: no terminal width to fit, keep the columns whole
    console.print(table)


def _bad_input_errors() -> tuple[type[BaseException], ...]:
    from kka_synth.agents.constraints import ConstraintError
    from kka_synth.agents.llm import ProposerError
    from kka_synth.data import DataError
    from kka_synth.data.download import DownloadError
    from kka_synth.data.export import ExportError
    from kka_synth.hub import PublishError
    from kka_synth.runs import RunError
    from kka_synth.utils.hub import ModelLoadError

    return (
        ConfigError,
        ConstraintError,
        DataError,
        DownloadError,
        ExportError,
        PublishError,
        RunError,
        ModelLoadError,
        ProposerError,
        ImportError,
        FileNotFoundError,
    )


def quiet_libraries(verbose: int = 0) -> None:
    """Keep the libraries' own progress bars and notices out of the run's output unless asked for.

    The CLI calls it for every subcommand; scripts that use the Python API call it to get the same output.
    """
    import os
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if verbose:
        return
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="trl")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    quiet_libraries(args.verbose)
    if getattr(args, "trust_remote_code", False):
        # an environment variable, so accelerate workers and subprocesses inherit the choice
        os.environ["KKA_SYNTH_TRUST_REMOTE_CODE"] = "1"
    try:
        if args.command == "run":
            return _run(args)
        if args.command == "eval":
            return _eval(args)
        if args.command == "chat":
            return _chat(args)
        if args.command == "publish":
            return _publish(args)
        if args.command == "export":
            return _export(args)
    except _bad_input_errors() as error:
        print(f"kka-synth: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        again = "the same command and --resume" if args.command == "run" else "the same command"
        print(f"kka-synth: interrupted; continue with {again}", file=sys.stderr)
        return 130
    parser.error(f"unknown command {args.command}")
    return 2


def _run(args: argparse.Namespace) -> int:
    from kka_synth.api import run
    from kka_synth.utils.dist import world

    config = config_from_args(args)
    main_process = world().is_main  # under accelerate launch only the main process draws and reports
    bars, update = _progress_bars(enabled=main_process and not args.no_progress and sys.stderr.isatty())
    with bars:
        finished = run(config, resume=args.resume, progress=update)
    if not main_process:
        return 0
    _summary(finished.stats())
    report = finished.report()
    print(f"run directory: {config.run_dir}")
    print(f"report: {report}")
    return 0


def _chat(args: argparse.Namespace) -> int:
    from kka_synth.agents.chat import ChatSession
    from kka_synth.agents.chat_intent import IntentChat, repl
    from kka_synth.api import make_config
    from kka_synth.runs import RunError

    run_dir = Path(args.run) if args.run else None
    if run_dir is not None:
        manifest = run_dir / "manifest.json"
        if not manifest.is_file():
            raise RunError(f"not a run directory: {run_dir} (no manifest.json)")
        stored = RunConfig.from_dict(json.loads(manifest.read_text())["config"])
        config = make_config(stored, **_proposer_overrides(args))
    else:
        config = config_from_args(args)
    prompts = Path(args.prompts)
    if run_dir is not None and not prompts.is_file() and (run_dir / "prompts.yaml").is_file():
        shutil.copyfile(run_dir / "prompts.yaml", prompts)  # start from the prompt set the run used
    preview_dir = Path(args.preview_dir) if args.preview_dir else (run_dir or Path(".")) / "previews"
    session = ChatSession(config, run_dir=run_dir, prompts_path=prompts, preview_dir=preview_dir)
    if config.proposer.backend == "compact":
        responder: Any = IntentChat(session)
    else:
        from kka_synth.agents.chat_agent import AgentChat, chat_model_for

        responder = AgentChat(chat_model_for(config.proposer), session)
    if args.prompt is not None:
        before = session.prompt_set.to_dict()
        print(responder.respond(args.prompt))
        if session.prompt_set.to_dict() != before and session.prompt_set.to_dict() != _saved(prompts):
            print(session.save_prompts())  # one shot: what it changed would be lost otherwise
        return 0
    print(responder.greeting)
    history = Path.home() / ".cache" / "kka-synth" / "chat_history"
    return repl(responder, read=input, write=print, history=history)


def _saved(path: Path) -> dict[str, Any] | None:
    from kka_synth.agents import PromptSet

    return PromptSet.load(path).to_dict() if path.is_file() else None


def _proposer_overrides(args: argparse.Namespace) -> dict[str, Any]:
    proposer = {
        key: getattr(args, flag)
        for flag, key in (("proposer", "backend"), ("proposer_model", "model"), ("base_url", "base_url"))
        if getattr(args, flag, None) is not None
    }
    return {"proposer": proposer} if proposer else {}


def _publish(args: argparse.Namespace) -> int:
    from kka_synth.api import publish

    if args.repo_id is None and args.dry_run is None:
        raise ConfigError("publish needs --repo-id USER/NAME (or --dry-run DIR to write the files locally)")
    bars, update = _progress_bars(enabled=not args.no_progress and sys.stderr.isatty())
    with bars:
        result = publish(
            args.run_dir,
            args.repo_id,
            private=args.private,
            include=args.include,
            split_by=args.split_by,
            token_env=args.token_env,
            dry_run=args.dry_run,
            license=args.license,
            progress=update,
        )
    for split, rows in result.rows.items():
        print(f"{split}: {rows} rows")
    if result.dry_run_dir is not None:
        print(f"dry run: {len(result.files)} files in {result.dry_run_dir}")
    else:
        print(f"published: {result.url}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from kka_synth.api import export

    result = export(args.run_dir, args.out_dir, format=args.format, include=args.include)
    for category, folders in result.counts.items():
        print(f"{category}: " + ", ".join(f"{folder} {count}" for folder, count in folders.items()))
    if result.skipped:
        print("skipped: " + ", ".join(f"{reason} {count}" for reason, count in result.skipped.items()))
    print(f"{result.anomalies} synthetic defects written to {result.out_dir}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from kka_synth.api import evaluate

    bars, update = _progress_bars(enabled=not args.no_progress and sys.stderr.isatty())
    with bars:
        summary = evaluate(
            args.run_dir,
            detectors=args.detectors,
            variants=args.variants,
            seeds=args.seeds,
            image_size=args.image_size,
            progress=update,
        )
    _metrics_tables(summary)
    report = write_report(args.run_dir)
    print(f"metrics: {Path(args.run_dir) / 'metrics.json'}")
    print(f"report: {report}")
    return 0


def write_report(run_dir: str | Path) -> Path:
    from kka_synth.eval.report import write_report as write

    return write(Path(run_dir))


def _metrics_tables(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    from kka_synth.eval.protocol import METRIC_TITLES, format_cell, shown_metrics

    console = Console()
    if not console.is_terminal:
        console.width = 160
    shown = shown_metrics(summary)
    if not summary["categories"]:
        console.print("no results: every variant was skipped (see the warnings above)")
    for category, detectors in summary["categories"].items():
        table = Table(title=f"{category}: real test split, mean ± std over {len(summary['seeds'])} seed(s)")
        for column in ("detector", "variant", *(METRIC_TITLES[m] for m in shown), "train s"):
            table.add_column(column, justify="left" if column in ("detector", "variant") else "right")
        for detector, variants in detectors.items():
            for variant, entry in variants.items():
                table.add_row(
                    detector,
                    variant,
                    *(format_cell(entry, m) for m in shown),
                    f"{entry['train_seconds']:.0f}",
                )
        console.print(table)


if __name__ == "__main__":
    sys.exit(main())
