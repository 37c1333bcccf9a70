"""Secrets out of text the gateway logs or passes on: every log line (gateway.logs),
provider error bodies above all.

Only secrets go: key-like strings, bearer tokens, credential headers, credentials in
URLs and credential query parameters. Everything else stays, addresses and hostnames
included, since the operator reading the log needs them to find what failed; whether a
caller may see such text at all is decided elsewhere (`expose_errors`).

Every rule is one branch of one regular expression, so a text is read once (a long
token kept as a name is searched once more, for a key inside it), and the text is cut
to a bounded length first, so a huge body costs little.
"""

from __future__ import annotations

import re

MARKER = "[redacted]"
# Enough for any provider's error message; past it, a body is cut before the scan.
LIMIT_CHARS = 2000

# Identifiers of requests and objects, which look random but are no secret and are
# what an operator searches for (ours is req_ + 32 hex digits; OpenAI's and
# Anthropic's ids carry these prefixes too).
_ID_PREFIXES = (
    "req_", "request_", "msg_", "chatcmpl-", "cmpl-", "resp_", "call_", "toolu_",
    "file-", "batch_", "org-", "proj_",
)  # fmt: skip

_SECRETS = re.compile(
    # Every branch begins where no letter or digit precedes (each branch's own \b or
    # look-behind says more). Tested once up front, a position inside a word costs one
    # test instead of eight branches: 1.8 to 2.7 times faster on log text.
    r"(?<![A-Za-z0-9])(?:"
    # Credential headers and fields, written as headers, JSON or key=value: the value
    # goes, its auth scheme (Bearer, Basic) stays for readability.
    r"""(?P<field>(?<![A-Za-z0-9_-])(?i:(?:proxy-)?authorization|x-api-key|x-goog-api-key|api[_-]?key"""
    r"""|access[_-]?token|client[_-]?secret|password)["']?\s*[:=]\s*["']?(?:(?i:bearer|basic|token)\s+)?)"""
    r"""[^\s"',;&<>(){}\[\]]+"""
    # Credentials in a URL: scheme://user:password@host keeps scheme and host.
    r"|(?P<url>\b[A-Za-z][A-Za-z0-9+.-]*://)[^\s/?#@:]*:[^\s/?#@]*@"
    # Other credential query parameters (and key=value in prose): key=, token=, ...
    r"|(?P<param>(?<![A-Za-z0-9_-])(?i:key|token|secret|sig|signature)=)"
    r"""[^\s&#"'<>(){}\[\]]+"""
    # A bearer token in prose; kept when the word after "Bearer" is plainly not one.
    r"|(?P<bearer>(?i:\bbearer)\s+)(?P<bearer_token>[A-Za-z0-9._~+/=-]{8,})"
    # A JSON Web Token: three base64url parts, the first always starting eyJ ({").
    r"|\beyJ[A-Za-z0-9_-]{6,}\.[A-Za-z0-9_-]{6,}\.[A-Za-z0-9_-]*"
    # Provider and gateway keys: OpenAI sk-, sk-proj-, Anthropic sk-ant-, ours gw-
    # (gateway/auth.py), masked forms included (sk-proj-****9c1e), after a - or _ too
    # (a header named X-gw-…), ours in capitals too (aiohttp's Python parser shouts a
    # method: GW-…); AWS access key ids.
    r"|(?<![A-Za-z0-9])(?:sk-[A-Za-z0-9_*\u2026-]{6,}|(?i:gw-)[A-Za-z0-9_-]{16,})"
    r"|(?<![A-Za-z0-9])(?:AKIA|ASIA)[A-Z0-9]{16}(?![A-Za-z0-9])"
    # Any other long token; replaced only if it looks random (see _looks_random).
    r"|(?P<token>(?<![A-Za-z0-9_-])[A-Za-z0-9_-]{24,})"
    r")"
)
_KEY_PREFIX = re.compile(r"sk-|(?i:gw-)|AKIA|ASIA|eyJ")
# A key inside a longer token that is kept: aiohttp quotes a header line as it read it,
# names run together ("HostConnectiongw-…"). One of our keys in 25 has no 16 letters and
# digits in a row (its - and _ split them), so its token may not look random.
_KEY_IN_TOKEN = re.compile(r"(?i:gw-)[A-Za-z0-9_-]{16,}|(?<![A-Za-z0-9])sk-[A-Za-z0-9_*\u2026-]{6,}")
# A run of letters and digits with no separator, as random keys have and names lack.
_RANDOM_RUN = re.compile(r"[A-Za-z0-9]{16,}")
# What a cut at the length limit may leave of a secret: the token it went through.
_CUT_TOKEN = re.compile(r"""[^\s"',;&{}\[\]()<>]*\Z""")


def redact(text: str, limit: int = LIMIT_CHARS) -> str:
    """The text, cut to `limit` characters, with every secret replaced by [redacted].

    A secret the cut went through is dropped whole (half a key no longer looks like
    one); the cut is marked with "…[truncated]".
    """
    truncated = len(text) > limit
    if truncated:
        text = _CUT_TOKEN.sub("", text[:limit])
    text = _SECRETS.sub(_replace, text)
    return text + "…[truncated]" if truncated else text


def _replace(found: re.Match[str]) -> str:
    if found["field"] is not None:
        return found["field"] + MARKER
    if found["url"] is not None:
        return found["url"] + MARKER + "@"
    if found["param"] is not None:
        return found["param"] + MARKER
    if found["bearer"] is not None:
        token = found["bearer_token"]
        # "Bearer authentication" is prose; a token has a digit, a key prefix or length.
        secret = len(token) >= 20 or any(c.isdigit() for c in token) or _KEY_PREFIX.match(token)
        return found["bearer"] + MARKER if secret else found[0]
    if found["token"] is not None:
        token = found["token"]
        return MARKER if _looks_random(token) else _KEY_IN_TOKEN.sub(MARKER, token)
    return MARKER


def _looks_random(token: str) -> bool:
    """A key-like token: a long run mixing letters and digits, and not a known id.

    Model names (claude-3-5-sonnet-20241022) and UUIDs are split by separators into
    short runs, so they stay; a 32-hex-digit key or a base62 secret does not.
    """
    if token.startswith(_ID_PREFIXES):
        return False
    return any(
        any(c.isdigit() for c in run) and any(c.isalpha() for c in run) for run in _RANDOM_RUN.findall(token)
    )
