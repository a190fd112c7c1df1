"""The `dsgw` command."""

from __future__ import annotations

import typer

app = typer.Typer(help="ds-gateway: Durable Streams on Redis Streams.", no_args_is_help=True)


@app.callback()
def _root() -> None:
    """ds-gateway: Durable Streams on Redis Streams, synced with Postgres."""


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(4437, help="Port to listen on."),
    workers: int = typer.Option(1, help="Gateway processes sharing the port."),
) -> None:
    """Run the gateway (REDIS_URL must name a running Redis)."""
    import uvicorn

    from .settings import Settings

    settings = Settings.from_env()
    if not settings.redis_url:
        raise typer.BadParameter("REDIS_URL is not set (use `dsgw dev` for an embedded Redis)")
    uvicorn.run(
        "gateway.app:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=10,
        lifespan="on",
    )


def main() -> None:
    app()


if __name__ == "__main__":
    main()
