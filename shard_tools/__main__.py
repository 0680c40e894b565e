"""`python -m shard_tools ...` = `make-shards ...`; `python -m shard_tools verify DIR` = `verify-shards DIR`."""

import sys

if len(sys.argv) > 1 and sys.argv[1] == "verify":
    from matpac_fast.interrupts import run_main
    from shard_tools.verify import main as verify_main

    run_main(verify_main, sys.argv[2:])

from shard_tools.cli import command  # noqa: E402

command()
