"""``gateway ...`` on the standard asyncio event loop, even with uvloop installed.

The gateway uses uvloop whenever it can import it (DESIGN §2, ``gateway/server.py``) and
has no switch for it. This launcher makes ``import uvloop`` fail in this process (and the
workers it forks), then runs the ``gateway`` command line unchanged, so the gateway takes
its own no-uvloop path: ``asyncio.Runner`` with the default loop. The gateway names the
loop it got in its startup log (``listening on ... (pid N, asyncio)``), and the benchmark
checks that line before measuring.

    .venv/bin/python bench/gateway_on_asyncio.py run -c routes.yaml --port 8080
"""

from __future__ import annotations

import sys

sys.modules["uvloop"] = None  # type: ignore[assignment]  # `import uvloop` now raises ImportError

from gateway.cli import main  # noqa: E402  (after the block above, which is the point)

if __name__ == "__main__":
    sys.exit(main())
