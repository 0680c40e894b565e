"""`python -m matpac_fast.evaluation ...` = `matpac-eval ...`."""

from matpac_fast.evaluation.cli import main

raise SystemExit(main())
