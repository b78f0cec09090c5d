"""`python -m apps.cli`: the `homeskillet` command without its console script."""

from apps.cli import app

app()
