"""The operators' web console at /ui/: server-rendered pages over the gateway's own figures.

Login with the admin key; sessions live in the ledger database (see sessions.py). Every
figure comes from the code the CLI and the admin API use: the ledger store's reports,
the quota limiter's readings, health.checked, the policy holder. docs/console.md says why.
"""

from gateway.console.app import CONSOLE_PREFIX, console_app

__all__ = ["CONSOLE_PREFIX", "console_app"]
