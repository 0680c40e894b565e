"""`python -m matpac_fast.evaluation ...` = `matpac-eval ...`."""

from matpac_fast.evaluation.entry import command

command()
