"""llama-cpp-python's OpenAI server on a Unix socket: ``python -m hpc.job.llamacpp_python``.

Its ``python -m llama_cpp.server`` has ``--host``/``--port`` only, and the job's engine must
listen where other users cannot connect (hpc.job.engines). This runs that same server, with
the same arguments, with ``--uds PATH`` in place of host and port: uvicorn, which it runs
on, serves a Unix socket when given one.
"""

from __future__ import annotations

import sys
from typing import Any


def main(argv: list[str]) -> None:
    """Run llama-cpp-python's server with ``argv`` (which holds ``--uds PATH``)."""
    if "--uds" not in argv or argv.index("--uds") + 1 >= len(argv):
        sys.exit("usage: python -m hpc.job.llamacpp_python --uds PATH [llama_cpp.server args]")
    at = argv.index("--uds")
    path = argv[at + 1]
    rest = argv[:at] + argv[at + 2 :]
    import uvicorn  # llama-cpp-python[server] brings it; imported late: only engines need it
    from llama_cpp.server.__main__ import main as serve

    run = uvicorn.run

    def on_socket(app: Any, **options: Any) -> None:
        options.pop("host", None)
        options.pop("port", None)
        run(app, uds=path, **options)

    uvicorn.run = on_socket  # llama_cpp.server looks it up when it starts the server
    sys.argv = ["llama_cpp.server", *rest]
    serve()  # type: ignore[no-untyped-call,unused-ignore]


if __name__ == "__main__":
    main(sys.argv[1:])
