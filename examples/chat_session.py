"""A scripted chat about the prompt set: constrain, propose, preview, approve, save, then run with it.

This is what ``kka-synth chat`` does, driven from code. The offline compact proposer cannot hold a
conversation, so :class:`IntentChat` maps each line onto the chat's tools (the same ones an LLM agent calls).
CPU only, no downloads; about 15 seconds once the compact proposer is cached (its first use pretrains it,
about a minute). ``--run`` then runs the KKA loop with the saved prompt set (minutes; see demo_api.py).

    python examples/chat_session.py [--out chat-example] [--run]

``KKA_SYNTH_EXAMPLE_TINY=1`` uses tiny settings so the script checks itself in seconds; CI runs it that way.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import kka_synth
from kka_synth.agents.chat import ChatSession
from kka_synth.agents.chat_intent import IntentChat
from kka_synth.cli import quiet_libraries

SCRIPT = [
    "focus on washer",
    "exclude rust",
    "size < 2%",
    "propose 4",
    "preview",
    "approve 1",
    "constraints",
    "save",
]
"""What the user types, one line at a time (try your own lines; "help" lists what the parser knows)."""

TINY = {
    "iterations": 1,
    "proposals_per_iteration": 12,
    "data": {"image_size": 64, "categories": ["washer"]},
    "proposer": {"pretrain_steps": 150},
    "evaluator": {"pretrain_epochs": 1, "epochs": 2, "size": 64, "crop": 32},
    "alignment": {"enabled": False},
}
"""Overrides for a smoke test (``KKA_SYNTH_EXAMPLE_TINY=1``); real use leaves them out."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="chat-example", help="folder for previews, prompts and the run")
    parser.add_argument("--run", action="store_true", help="then run the loop with the saved prompt set")
    args = parser.parse_args()
    quiet_libraries()  # the progress bars and notices the CLI also keeps out
    out = Path(args.out)
    tiny = TINY if os.environ.get("KKA_SYNTH_EXAMPLE_TINY") == "1" else {}

    config = kka_synth.make_config({"dataset": "demo", "out": str(out / "runs"), "name": "chat"}, **tiny)
    prompts = out / "prompts.yaml"
    session = ChatSession(config, prompts_path=prompts, preview_dir=out / "previews")
    chat = IntentChat(session)
    for line in SCRIPT:
        print(f"\nkka> {line}")
        print(chat.respond(line))

    print("\npreview images:")
    for path in sorted((out / "previews").glob("*-overlay.png")):
        print(f"  {path}")

    print(f"\nprompt set saved to {prompts}; run the loop with it:")
    print(f"  kka-synth run --dataset demo --prompts {prompts}")
    if args.run:
        run = kka_synth.run(config, prompts=str(prompts))
        for stats in run.stats():
            share = stats["hard_share"] or 0.0
            print(f"iteration {stats['iteration']}: {stats['kept']} kept, hard share {share:.2f}")
        specs = [row["spec"] for row in run.candidates() if row["spec"] is not None]
        types = ", ".join(sorted({spec["defect_type"] for spec in specs}))
        largest = max((spec["size"] for spec in specs), default=0.0)
        print(f"{len(specs)} specs parsed: types {types} (no rust), largest size {largest:.1%} (at most 2%)")


if __name__ == "__main__":
    main()
