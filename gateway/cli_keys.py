"""`dsgw rotate-keys`: add a webhook signing or callback-token key
(gateway/subscriptions/signing.py)."""

from __future__ import annotations

import typer

from .cli_support import CliError, with_redis

# Merged into `dsgw` by gateway/cli.py (a Typer added without a name lends it its commands).
commands = typer.Typer()


@commands.command("rotate-keys")
def rotate_keys_command(
    which: str = typer.Argument(..., help="signing (webhook Ed25519 key) or token (callback-token key)."),
    publish_ahead: int = typer.Option(
        300, "--publish-ahead", min=1, help="Seconds the new key is published before it signs."
    ),
    keep: int = typer.Option(3 * 3600, "--keep", min=1, help="Seconds a superseded key stays published."),
) -> None:
    """Add a new webhook signing or callback-token key (gateway/subscriptions/signing.py): every
    replica publishes it first, signs with it after --publish-ahead seconds; keys superseded more
    than --keep seconds ago are dropped."""
    from .settings import Settings
    from .subscriptions.signing import rotate_keys

    if which not in ("signing", "token"):
        raise CliError("rotate-keys takes signing or token")
    refresh_s = Settings.from_env().webhook_keys_refresh_s
    if publish_ahead <= refresh_s:
        raise CliError(f"--publish-ahead must exceed DSGW_WEBHOOK_KEYS_REFRESH_S ({refresh_s} s)")

    key = with_redis(
        lambda target: rotate_keys(target.client, which, publish_ahead_s=publish_ahead, keep_s=keep)
    )
    typer.echo(f"{which} key {key.kid} added; it signs from {key.active_from} (unix time)")
