"""SSH user authentication the way OpenSSH does it: keys first, then what the server asks.

paramiko's ``SSHClient`` answers a keyboard-interactive request (a one-time code after the
key, a Duo push prompt, a site password) with ``auth_interactive_dumb``: it prints the
prompt on stdout and reads the answer with ``input()``, echoed on the screen. This module
plugs into paramiko's ``auth_strategy`` hook instead and asks through a :data:`Prompter`
the caller passes in: the CLI passes :func:`terminal_prompter` when it runs on a terminal
(getpass on ``/dev/tty``: echo off, nothing logged or kept), and nothing when it does not,
so a background tunnel or a reconnect fails at once with a clear error instead of waiting
for an answer nobody can type. A rejected answer raises at once: the caller never retries
against a 2FA prompt (each try may burn a code, or lock the account).

Keys are tried in OpenSSH's order: the named identity files, then the agent's keys, then
``~/.ssh/id_*`` (the last two unless ``IdentitiesOnly``). After a key the server may say
"partial success" and ask for keyboard-interactive as well (``AuthenticationMethods
publickey,keyboard-interactive``); a server that takes keyboard-interactive alone is asked
after every key was refused.
"""

from __future__ import annotations

import getpass
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import paramiko
from paramiko.auth_strategy import AuthStrategy, SourceResult

KBD_INTERACTIVE = "keyboard-interactive"

# (title, instructions, [(prompt, echo), …]) -> one answer per prompt; paramiko's handler shape.
Prompter = Callable[[str, str, Sequence[tuple[str, bool]]], list[str]]


class PromptNeeded(paramiko.AuthenticationException):
    """The server asks keyboard-interactive questions and there is nobody to answer them."""


class PromptRejected(paramiko.AuthenticationException):
    """The server refused the answers typed at its keyboard-interactive prompts."""

    def __init__(self, prompts: Sequence[str]) -> None:
        super().__init__("keyboard-interactive answers rejected")
        self.prompts = list(prompts)


class EncryptedKey(paramiko.PasswordRequiredException):
    """Every key that could be tried was encrypted, and no passphrase is available."""


def terminal_prompter() -> Prompter:
    """Answers typed on the controlling terminal, never echoed (getpass opens /dev/tty)."""

    def ask(title: str, instructions: str, prompts: Sequence[tuple[str, bool]]) -> list[str]:
        notes = [line for line in (title.strip(), instructions.strip()) if line]
        if notes:
            with open("/dev/tty", "w", encoding="utf-8") as tty:
                tty.write("\n".join(notes) + "\n")
        # Even prompts the server marks "echo" are read hidden: a code on the screen (and
        # in a recorded terminal session) is a code someone else can read.
        return [getpass.getpass(text or "Answer: ") for text, _echo in prompts]

    return ask


def interactive_prompter() -> Prompter | None:
    """:func:`terminal_prompter` when this process runs on a terminal, else None (cron, CI,
    a batch job): without one, a server that asks for a code fails the login at once."""
    return terminal_prompter() if sys.stdin.isatty() else None


class KeysThenPrompts(AuthStrategy):
    """Public keys in OpenSSH's order, then keyboard-interactive if the server asks for it."""

    def __init__(
        self,
        user: str,
        identity_files: Sequence[Path],
        *,
        agent: bool,
        home_keys: bool,
        prompter: Prompter | None,
    ) -> None:
        super().__init__(ssh_config=paramiko.SSHConfig())
        self.user = user
        self.identity_files = list(identity_files)
        self.agent = agent
        self.home_keys = home_keys
        self.prompter = prompter
        self._encrypted = 0

    def get_sources(self) -> Iterator[paramiko.auth_strategy.AuthSource]:
        """Unused: :meth:`authenticate` walks the keys itself (it must see partial success)."""
        return iter(())

    def _load(self, paths: Sequence[Path]) -> Iterator[paramiko.PKey]:
        for path in paths:
            if not path.is_file():
                continue
            try:
                yield paramiko.PKey.from_path(path)
            except paramiko.PasswordRequiredException:
                self._encrypted += 1
            except (paramiko.SSHException, OSError, ValueError):
                continue  # not a key paramiko reads (OpenSSH skips such files, too)

    def _keys(self) -> Iterator[paramiko.PKey]:
        yield from self._load(self.identity_files)
        if self.agent:
            yield from self._agent_keys()
        if self.home_keys:
            home = Path("~/.ssh").expanduser()
            defaults = [home / f"id_{kind}" for kind in ("rsa", "ecdsa", "ed25519")]
            yield from self._load([p for p in defaults if p not in self.identity_files])

    @staticmethod
    def _agent_keys() -> Iterator[paramiko.PKey]:
        if not os.environ.get("SSH_AUTH_SOCK"):
            return
        agent = paramiko.Agent()
        try:
            yield from agent.get_keys()
        finally:
            agent.close()

    def authenticate(self, transport: paramiko.Transport) -> list[SourceResult]:
        """Log in as :attr:`user` on ``transport``; raises AuthenticationException (typed)."""
        try:
            transport.auth_none(self.user)
        except paramiko.BadAuthenticationType as exc:
            allowed = list(exc.allowed_types)
        else:
            return []  # the server asked for nothing
        refused: paramiko.AuthenticationException | None = None
        if "publickey" in allowed:
            for key in self._keys():
                try:
                    remaining = transport.auth_publickey(self.user, key)
                except paramiko.AuthenticationException as exc:
                    refused = exc
                    continue
                except paramiko.SSHException:
                    continue  # a key type this server does not take: try the next one
                if transport.is_authenticated():
                    return []
                allowed = list(remaining)  # partial success: the key was one factor of two
                refused = None
                break
        if KBD_INTERACTIVE in allowed:
            self._interactive(transport)
            return []
        if refused is None and self._encrypted:
            raise EncryptedKey("the key is encrypted and no passphrase is available")
        raise refused or paramiko.AuthenticationException(
            f"the server takes {', '.join(allowed) or 'nothing'} and no key was accepted"
        )

    def _interactive(self, transport: paramiko.Transport) -> None:
        asked: list[str] = []

        def handler(
            title: str, instructions: str, prompts: Sequence[tuple[str, bool]]
        ) -> list[str]:
            if not prompts:
                return []  # an info-only round (a banner); nothing to type
            asked.extend(text.strip() for text, _echo in prompts)
            if self.prompter is None:
                raise PromptNeeded(f"the server asks: {', '.join(asked)}")
            return self.prompter(title, instructions, prompts)

        try:
            remaining = transport.auth_interactive(self.user, handler)
        except PromptNeeded:
            raise
        except paramiko.AuthenticationException as exc:
            if self.prompter is None:
                raise PromptNeeded(f"the server asks: {', '.join(asked)}") from exc
            raise PromptRejected(asked) from exc
        if not transport.is_authenticated():
            raise paramiko.AuthenticationException(
                f"the server wants yet another method after the answers: {', '.join(remaining)}"
            )
