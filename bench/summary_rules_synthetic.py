"""The synthetic harness of ``hip-attn accuracy`` (generated attention inputs, 16 query blocks
per context and seed) scoring the node-summary variants of ``bench/summary_rules.py``; each
selection builds its variant's tree from the query block's keys. Results in
``bench/results/summary-rules-synthetic.json``; read in docs/accuracy.md ("Moment summaries at
their limit").

Run (2 cores, 2-4 minutes per configuration)::

    python bench/summary_rules_synthetic.py --methods oracle,quest,hip
    python bench/summary_rules_synthetic.py --methods hip,gauss125x,gausspair --beam 2 \\
        --query-pool-stride 1 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import summary_rules as sr  # noqa: E402

from hip_attn.accuracy.harness import format_table, run_accuracy  # noqa: E402
from hip_attn.accuracy.methods import METHODS, QueryBlock, Selection  # noqa: E402
from hip_attn.cli_args import add_hip_arguments, comma_list, hip_config_from_args  # noqa: E402
from hip_attn.config import HiPConfig  # noqa: E402
from hip_attn.geometry import tree_blocks  # noqa: E402
from hip_attn.perf.units import parse_tokens  # noqa: E402


def with_tree(name: str):  # noqa: ANN201
    """Variant ``name``'s selection, preceded by building its Gaussian tree from the block's
    keys (what ``summary_rules.method_attention`` does per layer)."""
    select = sr.VARIANTS[name][1]

    def selection(block: QueryBlock, config: HiPConfig) -> Selection:
        k = block.k.float()
        tree = sr.gaussian_tree(k, config, pair=select.pair, iso=select.iso)
        sr._STATE["layer"] = sr.LayerState(
            torch.empty(0), k, tree_blocks(k.shape[-2], config), tree
        )
        try:
            return select(block, config)
        finally:
            sr._STATE.clear()

    return selection


GAUSSIAN = [n for n, (_, f) in sr.VARIANTS.items() if f.gauss and not f.rank and not f.box]
for _name in GAUSSIAN:
    METHODS[_name] = (sr.VARIANTS[_name][0], with_tree(_name))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--context",
        type=comma_list(parse_tokens, "token counts"),
        default=[4096, 16384, 65536],
        help="context lengths (4k,16k,64k)",
    )
    parser.add_argument(
        "--methods",
        type=comma_list(str, "method names"),
        required=True,
        help=f"from {', '.join(['oracle', 'quest', 'hip', *GAUSSIAN])}",
    )
    parser.add_argument(
        "--sample",
        type=comma_list(int, "two counts"),
        default=[2, 14],
        metavar="LAST,SPREAD",
        help="query blocks scored per context: the last LAST and SPREAD spread over the rest "
        "(2,14; 2,0: the last two only)",
    )
    parser.add_argument("--json", help="write the results here as JSON")
    add_hip_arguments(parser)
    args = parser.parse_args(argv)  # fmt: skip
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        parser.error(f"--methods: unknown {unknown}")
    torch.set_num_threads(1)
    config = hip_config_from_args(args)
    if len(args.sample) != 2 or min(args.sample) < 0 or sum(args.sample) == 0:
        parser.error(f"--sample: two counts >= 0, not both 0; got {args.sample}")
    result = run_accuracy(args.context, config, methods=args.methods, seeds=(0, 1),
                          sample_last=args.sample[0], sample_spread=args.sample[1])  # fmt: skip
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
