"""Benchmark of the compact proposer: first-use pretraining, sampling time and valid share.

Run with ``OMP_NUM_THREADS=1 python benchmarks/bench_proposer.py``. Pretraining uses the default settings
(``ProposerConfig()``) in a fresh temporary cache, so the first-use cost is measured; then 64 completions
are sampled per category, constrained and unconstrained, for every category of the knowledge base.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import tempfile
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=64, help="completions per category and mode")
    parser.add_argument("--categories", nargs="*", default=None, help="categories (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as cache:
        os.environ["KKA_SYNTH_CACHE"] = cache
        from kka_synth.agents import CompactProposer, ProposalContext
        from kka_synth.config import ProposerConfig
        from kka_synth.prompts import all_knowledge

        config = ProposerConfig()
        started = time.perf_counter()
        proposer = CompactProposer(config, seed=args.seed)
        pretrain_s = time.perf_counter() - started
        started = time.perf_counter()
        CompactProposer(config, seed=args.seed)
        reload_s = time.perf_counter() - started

        parameters = sum(p.numel() for p in proposer.model.parameters())
        print(f"torch threads: {torch.get_num_threads()}")
        print(f"model: {parameters / 1e6:.2f} M parameters, vocabulary {len(proposer.tokenizer)} tokens")
        print(f"first use (corpus, tokenizer, {config.pretrain_steps} steps, save): {pretrain_s:.1f} s")
        print(f"second construction (from the cache): {reload_s:.2f} s")

        categories = args.categories or sorted(all_knowledge())
        proposer.propose(ProposalContext.for_category(categories[0]), 8, seed=0)  # warm-up
        for constrained in (True, False):
            proposer.config = ProposerConfig(constrained=constrained)
            times, valid, errors, tokens = [], 0, collections.Counter(), []
            for index, category in enumerate(categories):
                context = ProposalContext.for_category(category)
                started = time.perf_counter()
                proposals = proposer.propose(context, args.n, seed=args.seed + index)
                times.append(time.perf_counter() - started)
                valid += sum(p.spec is not None for p in proposals)
                errors.update(p.error for p in proposals if p.error)
                tokens += [
                    len(proposer.tokenizer.encode(p.text, add_special_tokens=False)) for p in proposals
                ]
            total = args.n * len(categories)
            mode = "constrained" if constrained else "unconstrained"
            print(
                f"{mode}: {args.n} completions in {statistics.mean(times):.3f} s mean "
                f"(min {min(times):.3f}, max {max(times):.3f}); valid {valid / total:.1%} of {total}; "
                f"{statistics.mean(tokens):.1f} tokens per completion; failures {dict(errors.most_common())}"
            )


if __name__ == "__main__":
    main()
