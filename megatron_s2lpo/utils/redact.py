"""Keep secrets (a server's API key) out of logs, launch commands and error messages.

`redact_command(cmd)` is the command line to show: the value after `--api-key` (and
`--admin-api-key`) replaced by `<redacted>`. SGLang 0.5.23 reads its key only from that flag
(`arg_groups/fields/serving.py`; no environment variable) and logs its resolved server arguments,
key included (`server_args=...`, `entrypoints/engine.py`), so a server started with a key runs
under this module as a filter:

    python -m megatron_s2lpo.utils.redact -- python -m sglang.launch_server ... --api-key @S2LPO_SECRET_0@

The secrets come in the environment variable S2LPO_REDACT_SECRETS (a JSON list), never in an
argument: the filter puts secret i where its command says `@S2LPO_SECRET_i@`, starts the command
in its own process group (the filter's: stopping that group stops the server and its children),
and copies everything the server and its children print to its own stdout with every secret
replaced by `<redacted>`. It ignores stop signals (they are for the server) and exits when the
server exits, with its status (dying by the same signal if the server did); the server dies with
it (a death signal), so SIGKILL of the process a launcher started still ends the server. The key is still in
the server's own argument list, which local users of the machine can read (SGLang takes it
nowhere else); the files the run writes and the errors it raises never hold it.

Stdlib only: it runs before anything heavy is imported.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time

SECRET_FLAGS = ("--api-key", "--admin-api-key")
SECRETS_ENV = "S2LPO_REDACT_SECRETS"
REDACTED = "<redacted>"


def placeholder(index: int) -> str:
    return f"@S2LPO_SECRET_{index}@"


def redact_command(command: list[str]) -> list[str]:
    """`command` with the value of every secret flag replaced by <redacted> (`--flag value` and `--flag=value`)."""
    out = []
    hide_next = False
    for arg in command:
        if hide_next:
            out.append(REDACTED)
            hide_next = False
        elif arg in SECRET_FLAGS:
            out.append(arg)
            hide_next = True
        elif arg.split("=", 1)[0] in SECRET_FLAGS and "=" in arg:
            out.append(arg.split("=", 1)[0] + "=" + REDACTED)
        else:
            out.append(arg)
    return out


def secrets_of(command: list[str]) -> list[str]:
    """The values of the secret flags in `command` (the API keys)."""
    found = []
    for i, arg in enumerate(command):
        if arg in SECRET_FLAGS and i + 1 < len(command):
            found.append(command[i + 1])
        elif "=" in arg and arg.split("=", 1)[0] in SECRET_FLAGS:
            found.append(arg.split("=", 1)[1])
    return [s for s in found if s]


def filtered_launch(command: list[str], env: dict[str, str] | None) -> tuple[list[str], dict[str, str] | None]:
    """(argv, env) that run `command` under the filter with its secrets passed in the environment;
    `command` itself when it holds none."""
    secrets = secrets_of(command)
    if not secrets:
        return command, env
    masked = list(command)
    for index, secret in enumerate(secrets):
        masked = [placeholder(index) if arg == secret else
                  arg.replace("=" + secret, "=" + placeholder(index)) if arg.startswith(SECRET_FLAGS) else arg
                  for arg in masked]
    child_env = dict(os.environ if env is None else env)
    child_env[SECRETS_ENV] = json.dumps(secrets)
    return [sys.executable, "-m", "megatron_s2lpo.utils.redact", "--", *masked], child_env


def scrub(data: bytes, secrets: list[bytes]) -> bytes:
    for secret in secrets:
        data = data.replace(secret, REDACTED.encode())
    return data


def _relay(fd: int, child: subprocess.Popen, secrets: list[bytes]) -> None:
    """Copy `fd` to stdout with secrets replaced, until EOF or shortly after `child` exited."""
    keep = max(len(s) for s in secrets) - 1  # a secret may straddle two reads
    pending = b""
    exited_at = None
    while True:
        if exited_at is None and child.poll() is not None:
            exited_at = time.monotonic()
        if exited_at is not None and time.monotonic() - exited_at > 1.0:
            break  # a child of the server still holds the pipe: the server is gone, so are we
        ready, _, _ = select.select([fd], [], [], 0.2)
        if not ready:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        pending = scrub(pending + chunk, secrets)
        cut = pending.rfind(b"\n") + 1 if b"\n" in pending else max(0, len(pending) - keep)
        out, pending = pending[:cut], pending[cut:]
        if out:
            os.write(1, out)
    if pending:
        os.write(1, scrub(pending, secrets))


def main(argv: list[str]) -> int:
    if argv[:1] != ["--"] or len(argv) < 2:
        print("usage: python -m megatron_s2lpo.utils.redact -- COMMAND... (secrets in $S2LPO_REDACT_SECRETS)",
              file=sys.stderr)
        return 2
    secrets = json.loads(os.environ.pop(SECRETS_ENV, "[]"))
    command = list(argv[1:])
    for index, secret in enumerate(secrets):
        command = [arg.replace(placeholder(index), secret) for arg in command]
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)  # for the server: it is in this process group
    read_fd, write_fd = os.pipe()
    child = subprocess.Popen(command, stdout=write_fd, stderr=write_fd, stdin=subprocess.DEVNULL,
                             restore_signals=True, preexec_fn=_child_setup)
    os.close(write_fd)
    _relay(read_fd, child, [s.encode() for s in secrets if s] or [REDACTED.encode()])
    code = child.wait()
    if code < 0:  # die the same way, so whoever started us sees the server's own end
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    return code


def _child_setup() -> None:
    """In the server's process before exec (this filter is single-threaded): the stop signals are the
    server's to handle (the filter ignores them), and the server dies with the filter, so that
    killing the process its launcher knows (the filter) kills the server too."""
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_DFL)
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
