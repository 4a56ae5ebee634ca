"""python -m bench [traffic | distributed | linear | sparse] [options]

Without a subcommand: the provider benchmark of bench/cli.py (`python -m bench --help`).
A subcommand hands the rest of the command line to bench/<name>.py, imported only when asked
for: traffic.py must set TRITON_INTERPRET before any Triton kernel is imported, and none
should pay for the others' imports.
"""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    "traffic": "bytes per logit element of the Triton kernels, counted under the interpreter",
    "distributed": "vocab-parallel kd_loss over several gloo processes",
    "linear": "the fused linear loss (hidden states + lm_head weights) against its GEMMs",
    "sparse": "the sparse (top-k) teacher loss against the eager top-k loss and dense kd_loss",
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        name, rest = argv[0], argv[1:]
        try:
            module = importlib.import_module(f"bench.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"bench.{name}":
                raise  # the module exists but one of its own imports is missing
            print(f"python -m bench {name}: bench/{name}.py is not part of this checkout yet "
                  f"({SUBCOMMANDS[name]}).", file=sys.stderr)
            return 2
        sys.argv = [f"python -m bench {name}", *rest]
        return int(module.main(rest) or 0)
    from .cli import main as bench_main

    return bench_main(argv)


if __name__ == "__main__":
    sys.exit(main())
