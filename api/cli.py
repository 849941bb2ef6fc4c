"""``cfic serve``: serve the REST API with uvicorn, loading the model once in the background.

The server listens at once: ``/healthz`` answers while the model (and the index) load on the model worker's
thread, ``/readyz`` says ``loading`` (503) until they are ready, and ``/ground`` answers 503 + Retry-After
meanwhile. Arguments that can be checked without loading anything (a model or adapter path that does not exist)
fail before the server starts; a load that fails later stops the server with the same ``error: ...`` and exit
code 2, so a supervisor sees the failure instead of a server that can never become ready.

Module imports stay light (typer, stdlib): the cfic CLI imports this to list its commands, and ``--help`` must
not load torch. ``python -m cfic.api.cli`` runs the same command on its own (the load test uses that). The
option defaults repeat ``ServiceSettings``'s (a test keeps them equal): importing the settings here would pull
numpy into ``cfic --help``."""

from __future__ import annotations

import ipaddress
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from cfic.cli_options import (
    AdapterOpt,
    DeviceOpt,
    DtypeOpt,
    FFNSkipOpt,
    LayerSkipOpt,
    LayerSkipWarmupOpt,
    ModelOpt,
    NoAdapterOpt,
    SwiftKVGroupOpt,
    SwiftKVLayerOpt,
    SwiftKVOpt,
)

log = logging.getLogger("cfic.api")

DEFAULT_MODEL = "smollm2-135m-instruct"  # cfic.models.DEFAULT_MODEL, named here without importing torch


def _model_problem(model: str | None, adapter: str | None, index: Path | None) -> str | None:
    """What is wrong with the model, adapter or index arguments, as far as a look at the file system tells
    (``cfic.models.resolve_model_path``'s checks, without its conversion of a .gguf file)."""
    if model is not None and model != DEFAULT_MODEL:
        path = Path(model).expanduser()
        if not (path.is_file() and path.suffix == ".gguf"):
            if not path.is_dir():
                return f"model {model!r} is not a local folder or .gguf file (hub downloads are not used)"
            if not (path / "config.json").is_file():
                return f"{path} has no config.json: not a Hugging Face model folder"
    if adapter is not None and adapter != "auto" and not Path(adapter).expanduser().is_dir():
        return f"adapter {adapter!r} is not a folder"
    if index is not None and not index.expanduser().is_dir():
        return f"index {str(index)!r} is not a folder (create one with `cfic index add`)"
    return None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve_command(
    ctx: typer.Context,
    host: Annotated[str, typer.Option("--host", help="Address to listen on. Keep the loopback default unless the "
                                                     "server sits behind something that needs it elsewhere.")]
    = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="TCP port.")] = 8000,
    index: Annotated[Path | None, typer.Option(
        "--index", help="A corpus index folder (`cfic index add`): requests may then omit `documents`.")] = None,
    model: ModelOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    adapter: AdapterOpt = None,
    no_adapter: NoAdapterOpt = False,
    api_key: Annotated[str | None, typer.Option(
        "--api-key", envvar="CFIC_API_KEY", show_default=False,
        help="Require 'Authorization: Bearer <key>' on /ground and /stats. Prefer the CFIC_API_KEY environment "
             "variable: a command-line argument is visible to other users of the machine.")] = None,
    max_queue: Annotated[int, typer.Option("--max-queue", min=1, help="Requests that may wait for the model; "
                                                                      "more get 503 + Retry-After.")] = 32,
    max_batch: Annotated[int, typer.Option("--max-batch", min=1, help="Waiting requests taken together in one "
                                                                      "worker turn.")] = 8,
    timeout: Annotated[float, typer.Option("--timeout", min=0.001, help="Seconds per request, queue wait "
                                                                        "included (504 beyond).")] = 60.0,
    cache_bytes: Annotated[str, typer.Option("--cache-bytes", help="Memory for cached document encodings (KV), "
                                                                   "e.g. 512MiB, 2GiB; 0 disables.")] = "1GiB",
    max_request_bytes: Annotated[str, typer.Option("--max-request-bytes", help="Largest request body (413 "
                                                                               "beyond).")] = "2MiB",
    max_documents: Annotated[int, typer.Option("--max-documents", min=1, help="Documents per request (413 "
                                                                              "beyond).")] = 4,
    max_document_chars: Annotated[int, typer.Option(
        "--max-document-chars", min=1, help="Characters per document (413 beyond); at most --max-total-chars.")]
    = 12_000,
    max_total_chars: Annotated[int, typer.Option(
        "--max-total-chars", min=1, help="Characters of all documents of a request together (413 beyond). The "
                                         "defaults fit the default model's prefill speed on a 2-core CPU within the "
                                         "default timeout; raise them with --timeout.")] = 12_000,
    log_level: Annotated[str, typer.Option("--log-level", help="debug, info, warning or error.")] = "info",
    swiftkv_layer: SwiftKVLayerOpt = None,
    swiftkv_group: SwiftKVGroupOpt = None,
    swiftkv: SwiftKVOpt = None,
    layer_skip: LayerSkipOpt = None,
    layer_skip_warmup: LayerSkipWarmupOpt = None,
    ffn_skip: FFNSkipOpt = None,
) -> None:
    """Serve POST /ground (verbatim evidence), GET /healthz, /readyz, /docs. The server listens at once and loads
    the model in the background (/readyz: 503 "loading" until it is ready); a failed load stops it (exit 2). The
    model and acceleration options are server-wide: requests cannot change them."""
    from cfic.api.settings import ServiceSettings
    from cfic.config import acceleration_options, adapter_choice, bound_kernel_caches
    from cfic.errors import CficError

    bound_kernel_caches()  # a server meets documents of every length: keep the kernel caches from growing
    adapter = adapter_choice(adapter, no_adapter)
    accel, swiftkv = acceleration_options(swiftkv_layer, swiftkv_group, swiftkv, layer_skip, layer_skip_warmup,
                                          ffn_skip)
    level = log_level.lower()
    if level not in ("debug", "info", "warning", "error"):
        raise CficError(f"unknown log level {log_level!r}; use debug, info, warning or error")
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("cfic").setLevel(level.upper())  # also when the cfic CLI configured logging first
    limits = {"max_request_bytes": max_request_bytes, "max_documents": max_documents,
              "max_document_chars": max_document_chars, "max_total_chars": max_total_chars, "max_queue": max_queue,
              "max_batch": max_batch, "timeout_s": timeout, "cache_bytes": cache_bytes}
    # Options left at their defaults give way to CFIC_SERVE_* environment variables (ServiceSettings reads them);
    # sizes are parsed by the settings ("512MiB"); a bad value is a CficError.
    given = {name: value for name, value in limits.items() if _given_on_command_line(ctx, name.removesuffix("_s"))}
    if api_key:  # else CFIC_SERVE_API_KEY, if set, still applies
        given["api_key"] = api_key
    settings = ServiceSettings(**given)
    if not _is_loopback(host) and settings.api_key is None:
        log.warning("listening on %s without an API key: anyone who can reach this address can use the model",
                    host)

    problem = _model_problem(model, adapter, index)
    if problem:
        raise CficError(problem)

    import uvicorn

    from cfic.api.app import create_app
    from cfic.config import GroundingConfig

    failure: list[str] = []
    server: uvicorn.Server | None = None

    def failed(exc: BaseException) -> None:
        """A background load failed: /readyz reports it until the server, told here to exit, has stopped."""
        failure.append(f"{type(exc).__name__}: {exc}" if not isinstance(exc, CficError) else str(exc))
        if server is not None:  # always set: the loaders run once the server has started
            server.should_exit = True

    def load_grounder():
        # Runs on the model worker's thread once the app starts: the server already answers /healthz.
        try:
            from cfic.grounder import Grounder

            grounder = Grounder.from_pretrained(model, device=device, dtype=dtype,
                                                adapter=adapter,
                                                swiftkv=swiftkv, **accel)
        except BaseException as exc:
            failed(exc)
            raise
        log.info("model %s loaded on %s (%s)", grounder.model_name, grounder.loaded.device, grounder.loaded.dtype)
        cfg = grounder.config
        if cfg.swiftkv_layer is not None or cfg.layer_skip or cfg.ffn_skip is not None:
            log.info("acceleration: swiftkv_layer=%s swiftkv_group=%s (%s) layer_skip=%s warmup=%s ffn_skip=%s",
                     cfg.swiftkv_layer, cfg.swiftkv_group,
                     "zero-training" if accel.get("swiftkv_layer") is not None and swiftkv in ("auto", "none")
                     else "distilled",
                     cfg.layer_skip, cfg.layer_skip_warmup, cfg.ffn_skip)
        return grounder

    def load_index():
        try:
            from cfic.retrieval.index import CorpusIndex

            corpus = CorpusIndex.open(index, device=device)
            _ = corpus.embedder  # load the embedding model now, not on the first request
        except BaseException as exc:
            failed(exc)
            raise
        log.info("index %s: %d documents", index, len(corpus))
        return corpus

    # The schema's span-token bounds come from the configuration the grounder will have (adapter settings only
    # add a threshold, a prior and an abstention model).
    app = create_app(load_grounder, index=load_index if index is not None else None, settings=settings,
                     config=GroundingConfig().with_options(**accel))
    # uvicorn's access log is off: the app logs one line per request with its request id (and never headers).
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=level, access_log=False,
                                           timeout_graceful_shutdown=10))
    log.info("loading the model in the background; /readyz answers 200 once it is ready")
    server.run()
    if failure:
        raise CficError(f"the server stopped: loading failed: {failure[0]}")


def _given_on_command_line(ctx: typer.Context, parameter: str) -> bool:
    """True unless the command line left ``parameter`` at its default."""
    source = ctx.get_parameter_source(parameter)
    return source is None or source.name != "DEFAULT"


def main() -> None:
    """``python -m cfic.api.cli``: the serve command alone, with the cfic CLI's error convention."""
    from cfic.errors import CficError

    app = typer.Typer(add_completion=False)
    app.command()(serve_command)
    try:
        app(standalone_mode=False)
    except CficError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except (typer.Exit, typer.Abort) as exc:
        sys.exit(getattr(exc, "exit_code", 1))
    except Exception as exc:  # click usage errors in non-standalone mode
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise


if __name__ == "__main__":
    main()
