"""cfic.api: the REST service. ``cfic.api.app.create_app`` builds the FastAPI app, ``cfic serve`` runs it
(``cfic.api.cli``), ``python -m cfic.api.loadtest`` measures it on the loopback interface.

Kept import-free so ``cfic --help`` never loads FastAPI or torch."""
