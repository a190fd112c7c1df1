"""The `dsgw` command."""

from __future__ import annotations

import os
from pathlib import Path

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


@app.command()
def dev(
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(4437, help="Port to listen on."),
    data_dir: Path = typer.Option(
        Path("data"), envvar="DSGW_DATA_DIR", help="Where embedded servers keep data."
    ),
) -> None:
    """Run everything on one machine: the gateway, plus an embedded Redis (AOF on,
    data in DATA_DIR/redis) when REDIS_URL is not set. Ctrl-C stops it all."""
    import uvicorn

    from .embedded import start_redis

    redis_proc = None
    if not os.environ.get("REDIS_URL"):
        data_dir = data_dir.resolve()
        redis_proc = start_redis(
            data_dir / "redis",
            # A fixed port keeps the printed redis-cli command valid across restarts.
            port=int(os.environ.get("DSGW_DEV_REDIS_PORT", "6390")),
            persistent=True,
            path_min_version=(7, 0),
            log_file=data_dir / "redis.log",
        )
        os.environ["REDIS_URL"] = redis_proc.url
    base_url = f"http://{host}:{port}"
    typer.echo(f"BASE_URL={base_url}")
    typer.echo(f"REDIS_URL={os.environ['REDIS_URL']}")
    typer.echo(f"inspect:  redis-cli -u {os.environ['REDIS_URL']} XRANGE 'ds:{{NAME}}:data' - +")
    typer.echo(f"try:      curl -X PUT -H 'content-type: application/json' {base_url}/v1/stream/hello")
    try:
        uvicorn.run(
            "gateway.app:create_app",
            factory=True,
            host=host,
            port=port,
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=10,
        )
    finally:
        if redis_proc is not None:
            redis_proc.stop()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
