"""The two error types a run reports without a traceback, and how scripts report them.

A `UserError` is a problem with the user's input (bad config, missing or corrupt file, bad request): retrying
cannot help. An `InfrastructureError` is storage or a host failing (Google Cloud Storage still failing after
its retries, a dropped connection, a peer that never reached a barrier): the Ray driver restarts the hosts
from the last committed checkpoint, and a single process stops so that running it again resumes. Entry
points print either as one line; anything else is a bug and keeps its traceback.
"""

import sys
from collections.abc import Callable
from typing import NoReturn

# Exit code of a command stopped by an infrastructure failure (EX_TEMPFAIL: try again later).
EXIT_INFRASTRUCTURE = 75


class UserError(ValueError):
    """A problem with the user's input; the message names the value and what was expected."""


class InteropError(UserError):
    """A folder or checkpoint cannot be converted; the message names the file or field and the expectation."""


class InfrastructureError(RuntimeError):
    """Storage or a host failed, not the user's input; the message names what failed and where."""


def run_cli(main: Callable[[], int | None]) -> NoReturn:
    """Run a script's main: a UserError becomes `error: ...` on stderr and exit 1, an InfrastructureError the
    same line and exit 75, Ctrl-C exits 130. On a machine without a TPU, libtpu is not started (see
    `platforms.skip_absent_tpu`)."""
    from mesh_transformer.platforms import skip_absent_tpu

    skip_absent_tpu()
    try:
        code = main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except InfrastructureError as e:
        print(f"error: {e} (not a problem with the input: run the command again)", file=sys.stderr)
        sys.exit(EXIT_INFRASTRUCTURE)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
