"""HTTP benchmark: the gateway against a bare aiohttp proxy (the floor), both in front of nginx.

Run: ./scripts/bench http            (full run: 3 rounds, 5 s per run, every scenario)
     ./scripts/bench http --smoke    (1 round, 1 s per run, the 200-token scenarios)
     ./scripts/bench http --compare REV[,REV...]   (also gateway@REV: the gateway as of each revision)
See runner.py for what runs when, and report.py for the figures and the verdict.
"""
