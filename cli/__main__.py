"""``python -m mla_retrofit_cli`` runs the CLI (the same app as the ``mla-retrofit`` command)."""

from .main import app

app()
