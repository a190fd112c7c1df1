"""`dsgw subscriptions`: every subscription with its cursors and wake state, read from Redis
(at most state.LISTED_LINKS_MAX streams each; `streams_total` says how many it links)."""

from __future__ import annotations

from typing import Any

from .state import SubState


async def list_subscriptions(mux: Any) -> list[dict[str, Any]]:
    state = SubState(mux)
    rows = []
    for sub_id in await state.ids():
        rec = await state.load(sub_id)
        if rec is None:
            continue
        d, st = rec["def"], rec["state"]
        rows.append(
            {
                "id": sub_id,
                "type": d["type"],
                "pattern": d.get("pattern") or None,
                "target": d.get("url") or d.get("wake_stream") or "",
                "generation": int(st.get("gen", "0")),
                "wake_id": st.get("wake") or None,
                "holder": st.get("holder") or None,
                "lease_until_ms": int(st["lease"]) if st.get("lease") else None,
                "next_attempt_ms": int(st["due"]) if st.get("due") else None,
                "status": st.get("status", "active"),
                "retries": int(st.get("retries", "0")),
                "lease_expiries": int(st.get("expiries", "0")),
                "streams_total": rec["links_total"],
                "streams": [
                    {
                        "path": path,
                        "link": "explicit" if "e" in types else "glob",
                        "acked": rec["acked"].get(path),
                        "tail": rec["tails"].get(path),
                    }
                    for path, types in sorted(rec["links"].items())
                ],
            }
        )
    return rows
