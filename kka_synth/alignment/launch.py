"""DPO of one iteration in worker processes started by ``accelerate launch`` (several GPUs or nodes).

With ``alignment.processes`` above 1 the loop does not train in its own process. It runs::

    accelerate launch --num_processes N -m kka_synth.alignment.launch RUN_DIR K OUT_DIR SEED

Every worker rebuilds the model DPO trains from the run directory alone (the proposer's base weights, the
adapters of iterations before K), reads iteration K's ``pairs.jsonl`` and calls the same
:func:`kka_synth.alignment.dpo.train_dpo` as a single process would; TRL's trainer shards the batches over the
workers. The main worker saves the adapter and ``dpo_result.json`` to OUT_DIR, and the loop then applies the
adapter as after an in-process round.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from kka_synth.config import RunConfig
from kka_synth.runs import atomic_write_json, read_jsonl
from kka_synth.types import PreferencePair

logger = logging.getLogger(__name__)

RESULT_FILE = "dpo_result.json"


class LaunchError(RuntimeError):
    """The DPO workers failed; the message is one line with the tail of their output."""


def launch_command(run_dir: Path, k: int, out_dir: Path, seed: int, processes: int, cpu: bool) -> list[str]:
    """The ``accelerate launch`` command line that trains iteration ``k`` of ``run_dir`` into ``out_dir``."""
    accelerate = shutil.which("accelerate") or str(Path(sys.executable).with_name("accelerate"))
    command = [accelerate, "launch", "--num_processes", str(processes), "--num_machines", "1"]
    command += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    # --multi_gpu is what starts N processes, over NCCL on GPUs and gloo on a CPU-only machine; --cpu alone
    # starts a single one
    if processes > 1:
        command.append("--multi_gpu")
    elif cpu:
        command.append("--cpu")
    return [*command, "-m", "kka_synth.alignment.launch", str(run_dir), str(k), str(out_dir), str(seed)]


def run_workers(run_dir: Path, k: int, out_dir: Path, seed: int, processes: int, cpu: bool) -> dict[str, Any]:
    """Run the workers and return what the main one wrote to ``dpo_result.json``."""
    command = launch_command(run_dir, k, out_dir, seed, processes, cpu)
    logger.info("dpo: %s", " ".join(command))
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    result = out_dir / RESULT_FILE
    if done.returncode != 0 or not result.is_file():
        lines = [line for line in (done.stderr or done.stdout).strip().splitlines() if line.strip()]
        logger.debug("dpo workers' output:\n%s\n%s", done.stdout, done.stderr)
        raise LaunchError(
            f"accelerate launch of the DPO round failed (exit {done.returncode}): "
            f"{lines[-1] if lines else 'no output'}"
        )
    return json.loads(result.read_text())


def training_inputs(config: RunConfig, run_dir: Path, k: int) -> tuple[Any, Any, Path | None]:
    """(model, tokenizer, adapter to continue) for iteration ``k``, rebuilt from the run directory.

    The compact proposer merges the adapters of iterations before ``k``; the LLM backends load their base
    weights with transformers and continue the adapter of iteration ``k - 1``.
    """
    adapters = [run_dir / "adapters" / str(j) for j in range(1, k)]
    adapters = [path for path in adapters if (path / "adapter_config.json").is_file()]
    if config.proposer.backend == "compact":
        from kka_synth.agents import build_proposer

        proposer = build_proposer(config.proposer, seed=config.seed, knowledge_file=config.data.knowledge)
        for path in adapters:
            proposer.apply_adapter(path)
        return proposer.model, proposer.tokenizer, None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kka_synth.utils.devices import resolve_dtype
    from kka_synth.utils.hub import load_pretrained

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_dtype(config.proposer.dtype, device, cuda_auto="bfloat16")
    what, field = "the proposer LLM", "proposer.model"
    model_id = str(config.proposer.model)
    tokenizer = load_pretrained(AutoTokenizer.from_pretrained, model_id, what, field)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = load_pretrained(AutoModelForCausalLM.from_pretrained, model_id, what, field, dtype=dtype)
    return model, tokenizer, adapters[-1] if adapters else None


def main(argv: list[str] | None = None) -> int:
    """Worker entry: ``python -m kka_synth.alignment.launch RUN_DIR K OUT_DIR SEED`` (under accelerate)."""
    from accelerate import PartialState

    from kka_synth.alignment.dpo import train_dpo

    args = argv or sys.argv[1:]
    run_dir, k, out_dir, seed = Path(args[0]), int(args[1]), Path(args[2]), int(args[3])
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    config = RunConfig.from_dict(manifest["config"])
    pairs = [PreferencePair(**row) for row in read_jsonl(run_dir / "iterations" / str(k) / "pairs.jsonl")]
    model, tokenizer, start = training_inputs(config, run_dir, k)
    result = train_dpo(model, tokenizer, pairs, config.alignment, out_dir, seed=seed, start_adapter=start)
    if PartialState().is_main_process:
        atomic_write_json(
            out_dir / RESULT_FILE,
            {
                "steps": result.steps,
                "train_loss": result.train_loss,
                "margin_before": result.margin_before,
                "margin_after": result.margin_after,
                "processes": PartialState().num_processes,
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
