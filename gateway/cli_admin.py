"""`dsgw reshard`, `check-config` and `token`: operating a deployment (moving
streams to another shard count, checking the settings) and minting development
tokens and API keys."""

from __future__ import annotations

import typer

from .cli_support import CliError, masked, print_json, run_async, with_redis

# Merged into `dsgw` by gateway/cli.py (a Typer added without a name lends it its commands).
commands = typer.Typer()


# --- configuration -------------------------------------------------------------------


@commands.command()
def reshard(
    to: int = typer.Option(..., "--to", min=1, max=16384, help="The new shard count (DSGW_SHARDS)."),
    drop_feeds: bool = typer.Option(
        False, "--drop-feeds", help="Discard sync feed entries no sink has acknowledged (no sink runs)."
    ),
) -> None:
    """Move every stream to the shards of another shard count. Offline: stop every gateway and
    worker first (after the sink drained the feeds); rerun it if it is interrupted."""
    from .reshard import ReshardError
    from .reshard import reshard as move

    try:
        report = with_redis(
            lambda target: move(target.client, to, drop_feeds=drop_feeds, progress=typer.echo)
        )
    except ReshardError as exc:
        raise CliError(str(exc)) from None
    typer.echo(
        f"{report.source} -> {report.target}: moved {report.streams} streams ({report.keys} keys,"
        f" {report.members} deadlines and wake-ups) in {report.seconds:.1f} s; now start with DSGW_SHARDS={to}"
    )


@commands.command("check-config")
def check_config(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Print the effective settings and what is wrong with them (Redis and Postgres
    included); exit code 1 when something is."""
    from .configcheck import check

    report = run_async(check(masked))
    if as_json:
        print_json(report)
    else:
        for section in ("gateway", "workers", "dev"):
            typer.echo(f"[{section}]")
            for key, value in report["settings"][section].items():
                typer.echo(f"  {key} = {value}")
            if not report["settings"][section]:
                typer.echo("  (unreadable: see the problems below)")
        if report["problems"]:
            typer.echo("problems:")
            for problem in report["problems"]:
                typer.echo(f"  {problem['level']}: {problem['message']}")
        errors = sum(1 for p in report["problems"] if p["level"] == "error")
        warnings = len(report["problems"]) - errors
        typer.echo(f"{errors} error(s), {warnings} warning(s)" if report["problems"] else "ok")
    if any(p["level"] == "error" for p in report["problems"]):
        raise typer.Exit(1)


# --- auth: development tokens and API keys ------------------------------------------------


@commands.command()
def token(
    read: list[str] = typer.Option([], "--read", help="Glob of streams it may read (repeatable)."),
    append: list[str] = typer.Option([], "--append", help="Glob of streams it may append to."),
    manage: list[str] = typer.Option([], "--manage", help="Glob of streams it may create, fork, delete."),
    ttl: str = typer.Option("1h", "--ttl", help="Lifetime: 45s, 30m, 1h, 7d."),
    sub: str = typer.Option("dev", "--sub", help="Subject (rate limits count per subject)."),
    api_key: str = typer.Option(
        "", "--api-key", metavar="NAME", help="Instead: a new API key and its DSGW_AUTH_KEYS_FILE entry."
    ),
) -> None:
    """Mint a development HS256 token from DSGW_AUTH_JWT_SECRET (globs: `*` stays
    within one path segment, `**` crosses `/`), or a new API key."""
    import json

    from .auth import dev_token, new_api_key, parse_duration
    from .settings import Settings

    ds = {op: globs for op, globs in (("read", read), ("append", append), ("manage", manage)) if globs}
    if not ds:
        raise CliError("grant something: --read, --append and/or --manage GLOB")
    if api_key:
        key, entry = new_api_key(api_key, ds)
        typer.echo(key)
        typer.echo(f"add to the keys list of DSGW_AUTH_KEYS_FILE: {json.dumps(entry)}", err=True)
        return
    try:
        typer.echo(dev_token(Settings.from_env(), ds, parse_duration(ttl), sub))
    except ValueError as exc:
        raise CliError(str(exc)) from None
