"""The HTML pages of signed approval links: the confirm page, the outcome, and each refusal.

Self-contained (no script, no external asset: the CSP forbids both), every value
HTML-escaped, never the token: a page may be screenshotted into a ticket. The token
travels only in the confirm form's hidden field.
"""

from __future__ import annotations

from html import escape
from typing import Literal

from fastapi.responses import HTMLResponse

from tasks.approvals.desk import Decided, Looked
from tasks.approvals.signing import LinkClaims

#: On every approval page: never cached, never indexed, no Referer (the URL holds the token).
HEADERS = {
    "Cache-Control": "no-store",
    "Pragma": "no-cache",
    "Referrer-Policy": "no-referrer",
    "X-Robots-Tag": "noindex",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
}

_STYLE = """
body{font-family:system-ui,sans-serif;max-width:46rem;margin:2rem auto;padding:0 1rem;
color:#1b1b1b;line-height:1.45}
h1{font-size:1.4rem}dt{font-weight:600;margin-top:.6rem}dd{margin-left:1rem}
pre{background:#f4f4f4;padding:.7rem;overflow-x:auto;white-space:pre-wrap;font-size:.85rem}
textarea{width:100%;min-height:5rem;font:inherit}
button{font-size:1.1rem;padding:.5rem 1.4rem;margin-top:.8rem;cursor:pointer}
.approve{background:#1a7f37;color:#fff;border:0}.refuse{background:#b42318;color:#fff;border:0}
.note{color:#555;font-size:.9rem}
"""

Problem = Literal[
    "not-configured",
    "malformed",
    "forged",
    "expired",
    "wrong-run",
    "not-waiting",
    "stale",
    "used",
    "unavailable",
]

#: Each refusal: HTTP status, title, and what the person reads.
PROBLEMS: dict[Problem, tuple[int, str, str]] = {
    "not-configured": (
        503,
        "Approval links are not configured",
        "This receiver has no approval signing key: approval links are not configured."
        " Nothing was recorded. Use the run's page in the Prefect UI, or ask the operator.",
    ),
    "malformed": (
        400,
        "This is not an approval link",
        "The link is damaged or incomplete (copied in part?). Nothing was recorded."
        " Open the link from the page you received, whole.",
    ),
    "forged": (
        403,
        "This approval link is not genuine",
        "The link's signature does not hold: it was altered or not made by this system."
        " Nothing was recorded.",
    ),
    "expired": (
        410,
        "This approval link has expired",
        "Approval links work for a limited time. Nothing was recorded. If the run still"
        " waits, the newest page has fresh links, or use the run's page in the Prefect UI.",
    ),
    "wrong-run": (
        404,
        "Wrong run",
        "This link names a run that does not exist here or never asked for an approval."
        " Nothing was recorded.",
    ),
    "not-waiting": (
        409,
        "The run no longer waits for an approval",
        "The run was already decided, ended, or is not paused. Nothing was recorded.",
    ),
    "stale": (
        409,
        "This link is for an older plan",
        "This link is for an older plan: the run re-planned since. Nothing was recorded;"
        " use the links of the newest page.",
    ),
    "used": (
        409,
        "This link was already used",
        "A link decides once, and this one (or your other link for this plan) already did."
        " Nothing more was recorded.",
    ),
    "unavailable": (
        502,
        "Prefect did not answer",
        "The receiver could not reach Prefect to check the run. Nothing was recorded;"
        " try the link again in a minute.",
    ),
}


def html_page(title: str, body: str, status: int) -> HTMLResponse:
    """A whole page: `body` must already be escaped HTML."""
    text = (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        '<meta name=viewport content="width=device-width,initial-scale=1">'
        '<meta name=robots content="noindex,nofollow">'
        f"<title>{escape(title)}</title><style>{_STYLE}</style></head>"
        f"<body><h1>{escape(title)}</h1>{body}</body></html>"
    )
    return HTMLResponse(text, status_code=status, headers=HEADERS)


def problem_page(problem: Problem, detail: str = "") -> HTMLResponse:
    """A refusal: what happened, that nothing was recorded, what to do."""
    status, title, text = PROBLEMS[problem]
    extra = f'<p class="note">{escape(detail)}</p>' if detail else ""
    return html_page(title, f"<p>{escape(text)}</p>{extra}", status)


def _items(lines: list[str]) -> str:
    return "<ul>" + "".join(f"<li>{escape(x)}</li>" for x in lines) + "</ul>"


def confirm_page(claims: LinkClaims, looked: Looked, token: str, form_action: str) -> HTMLResponse:
    """The plan, who decides, the evidence, and the button that makes this link's decision."""
    request = looked.request
    assert request is not None  # a stale link gets the stale page
    choice = "Approve" if claims.choice == "approve" else "Refuse"
    facts = (
        "<dl>"
        f"<dt>Runbook</dt><dd>{escape(request.runbook)}</dd>"
        f"<dt>Run</dt><dd>{escape(looked.run_name or request.run)}</dd>"
        f"<dt>You</dt><dd>{escape(claims.recipient)}</dd>"
        f"<dt>This link</dt><dd><strong>{choice}</strong></dd>"
        "</dl>"
    )
    plan = "<h2>The plan</h2>" + _items(request.actions)
    needs = "<h2>Who must approve</h2>" + _items([r.line() for r in request.requirements])
    evidence = f"<h2>Evidence</h2><pre>{escape(request.evidence or '(none)')}</pre>"
    form = (
        f'<form method="post" action="{escape(form_action)}">'
        f'<input type="hidden" name="token" value="{escape(token)}">'
        '<label for="reason">Reason (recorded in the audit)</label>'
        '<textarea id="reason" name="reason" maxlength="2000"></textarea>'
        f'<button type="submit" class="{claims.choice}">Confirm: {choice}</button>'
        "</form>"
        '<p class="note">Nothing is recorded until you confirm. This link is yours alone'
        " and decides once.</p>"
    )
    return html_page(f"{choice} {request.runbook}?", facts + plan + needs + evidence + form, 200)


#: The outcome of a confirmed decision: HTTP status and title.
OUTCOMES: dict[str, tuple[int, str]] = {
    "recorded": (200, "Decision recorded"),
    "used": (409, "This link was already used"),
    "stale": (409, "This link is for an older plan"),
    "not-waiting": (409, "The run no longer waits for an approval"),
    "not-allowed": (403, "Recorded, not counted: you are not an allowed approver"),
}


def outcome_page(decided: Decided, run_url: str) -> HTMLResponse:
    """What the confirm did, in words, and the run's page in the Prefect UI."""
    status, title = OUTCOMES[decided.outcome]
    link = f'<p><a href="{escape(run_url)}">The run in the Prefect UI</a></p>' if run_url else ""
    return html_page(title, f"<p>{escape(decided.message)}</p>{link}", status)
