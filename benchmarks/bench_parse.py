"""Parse a corpus of hand-written instruct-LLM replies: strict vs lenient, repairs, retries, time per reply.

The corpus (``tests/data/replies.jsonl``) holds one reply per line with its category, the expected outcome,
the failure mode it shows, and what a model answers after the retry message (or null). With ``--retries N``
a scripted model answers each retry message with that retry reply; a reply without one is answered with the
same failing reply again, and so is every retry after the first.

Run with ``OMP_NUM_THREADS=1 python benchmarks/bench_parse.py``.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import time
from pathlib import Path

from kka_synth.agents import ProposalContext
from kka_synth.agents.guidance import retry_message
from kka_synth.agents.parsing import extract_object, parse_reply
from kka_synth.types import DefectSpec, SpecError

CORPUS = Path(__file__).resolve().parent.parent / "tests" / "data" / "replies.jsonl"


def strict_parse(text: str, context: ProposalContext) -> bool:
    """Plain ``json.loads`` of the whole reply, then the spec rules: no lenient step at all."""
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        return False
    if not isinstance(data, dict):
        return False
    try:
        DefectSpec.from_text(json.dumps(data), context.category, list(context.knowledge.defect_types))
    except (SpecError, ValueError):
        return False
    return True


def time_per_reply(texts: list[str], contexts: list[ProposalContext], repeat: int, parse) -> list[float]:
    """Microseconds per reply, the best of ``repeat`` runs over each reply."""
    times = []
    for text, context in zip(texts, contexts, strict=True):
        best = float("inf")
        for _ in range(repeat):
            started = time.perf_counter()
            parse(text, context)
            best = min(best, time.perf_counter() - started)
        times.append(best * 1e6)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=CORPUS, help="replies JSONL file")
    parser.add_argument("--retries", type=int, default=2, help="retry messages per failed reply")
    parser.add_argument("--repeat", type=int, default=20, help="timing runs per reply (best is kept)")
    args = parser.parse_args()

    lines = [json.loads(line) for line in args.corpus.read_text("utf-8").splitlines() if line.strip()]
    contexts = [ProposalContext.for_category(line["category"]) for line in lines]
    texts = [line["reply"] for line in lines]
    total = len(lines)

    strict = sum(strict_parse(text, context) for text, context in zip(texts, contexts, strict=True))
    results = [parse_reply(text, context) for text, context in zip(texts, contexts, strict=True)]
    lenient = sum(proposal.spec is not None for proposal, _ in results)
    reasons = collections.Counter(proposal.error for proposal, _ in results if proposal.error)
    outcomes = [proposal.error or "ok" for proposal, _ in results]
    expected = sum(outcome == line["expect"] for outcome, line in zip(outcomes, lines, strict=True))
    repairs: collections.Counter[str] = collections.Counter()
    repaired = 0
    for text in texts:
        try:
            names = extract_object(text)[1]
        except SpecError:
            continue
        repairs.update(names)
        repaired += bool(names)

    final, retries_used, messages = 0, [], []
    for line, context, (proposal, detail) in zip(lines, contexts, results, strict=True):
        used = 0
        while proposal.error is not None and used < args.retries:
            messages.append(retry_message(proposal.error, detail, context))
            used += 1
            answer = line["retry"] if line["retry"] is not None else line["reply"]
            proposal, detail = parse_reply(answer, context)
        final += proposal.spec is not None
        retries_used.append(used)

    print(f"corpus: {total} replies, {len({line['mode'] for line in lines})} modes, {args.corpus.name}")
    print(f"strict (json.loads only): {strict} parsed ({strict / total:.1%})")
    print(
        f"lenient (extraction + repairs): {lenient} parsed ({lenient / total:.1%}); {repaired} needed repairs"
    )
    print(f"outcome as the corpus expects: {expected} of {total}")
    print("rejected by reason: " + ", ".join(f"{name} {count}" for name, count in reasons.most_common()))
    print("repairs used: " + ", ".join(f"{name} {count}" for name, count in repairs.most_common()))
    failed_first = total - lenient
    print(
        f"with up to {args.retries} retries: {final} parsed ({final / total:.1%}); "
        f"{final - lenient} of {failed_first} first-try failures recovered; "
        f"mean retries {statistics.mean(retries_used):.2f} per reply, "
        f"{sum(retries_used) / max(failed_first, 1):.2f} per failed reply; "
        f"retry message {statistics.mean(len(m) for m in messages) if messages else 0:.0f} chars mean"
    )

    parse_us = time_per_reply(texts, contexts, args.repeat, parse_reply)
    strict_us = time_per_reply(texts, contexts, args.repeat, strict_parse)
    chars = statistics.mean(len(text) for text in texts)
    for name, times in (("parse_reply", parse_us), ("strict json.loads + spec", strict_us)):
        ordered = sorted(times)
        print(
            f"{name}: {statistics.mean(times):.1f} us per reply mean, median {statistics.median(times):.1f}, "
            f"p95 {ordered[int(0.95 * (len(ordered) - 1))]:.1f}, max {ordered[-1]:.1f} "
            f"(replies {chars:.0f} chars mean)"
        )


if __name__ == "__main__":
    main()
