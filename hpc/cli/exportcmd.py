"""`mt export TOOL`: a config snippet that points LiteLLM, LibreChat, Open WebUI, LlamaStack
or OpenShift Lightspeed at the gateway (docs/integrations.md)."""

from __future__ import annotations

import socket
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from hpc.cli.context import CliContext
from hpc.cli.output import stderr
from hpc.cli.servecmds import served
from hpc.errors import MTError
from hpc.export import DEFAULT_KEY_ENV, DEFAULT_SECRET, render
from hpc.privatefile import write_private
from hpc.site import GatewaySite


class ToolChoice(str, Enum):
    """The tools `mt export` writes for (the same names as ``hpc.export.TOOLS``)."""

    litellm = "litellm"
    librechat = "librechat"
    openwebui = "openwebui"
    llamastack = "llamastack"
    olsconfig = "olsconfig"


def default_gateway_url(gateway: GatewaySite) -> str:
    """Where site.yaml says the gateway listens; a wildcard bind becomes this host's name."""
    return gateway.url(wildcard_as=socket.getfqdn())


def export(
    ctx: typer.Context,
    tool: Annotated[ToolChoice, typer.Argument(help="Which tool's config to write.")],
    gateway_url: Annotated[
        str | None,
        typer.Option(
            "--gateway-url",
            help="The gateway as the tool reaches it (default: site.yaml's, "
            "http://127.0.0.1:8081/v1).",
        ),
    ] = None,
    key_env: Annotated[
        str,
        typer.Option("--key-env", help="Environment variable the tool reads the gateway key from."),
    ] = DEFAULT_KEY_ENV,
    secret: Annotated[
        str, typer.Option("--secret", help="olsconfig: the Secret holding the key (apitoken).")
    ] = DEFAULT_SECRET,
    direct: Annotated[
        bool,
        typer.Option("--direct", help="litellm: route to the ready backends, not the gateway."),
    ] = False,
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Write here (default: stdout).")
    ] = None,
) -> None:
    """Write a config snippet that points another tool at ModelTainer (no key in it)."""
    if direct and tool is not ToolChoice.litellm:
        raise typer.BadParameter("--direct is for litellm only", param_hint="--direct")
    cli: CliContext = ctx.obj
    url = gateway_url or default_gateway_url(cli.site().config.gateway)
    exported = render(
        tool.value,
        served(cli),
        gateway_url=url,
        key_env=key_env,
        secret=secret,
        direct=direct,
    )
    for name in exported.skipped:
        stderr().print(f"not exported: {name} has no ready endpoint (mt submit {name})")
    if output is None:
        sys.stdout.write(exported.text)
        sys.stdout.flush()
        return
    try:
        write_private(output, exported.text.encode(), replace=True)
    except OSError as exc:
        raise MTError(
            f"cannot write {output}: {exc.strerror}", hint="pick another -o path"
        ) from exc
    stderr().print(f"wrote {tool.value} config to {output}")
