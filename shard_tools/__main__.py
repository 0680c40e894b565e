"""`python -m shard_tools ...` = `make-shards ...`; `python -m shard_tools verify DIR` = `verify-shards DIR`."""

import sys

if len(sys.argv) > 1 and sys.argv[1] == "verify":
    from shard_tools.verify import main as verify_main

    sys.exit(verify_main(sys.argv[2:]))

from shard_tools.cli import main  # noqa: E402

sys.exit(main())
