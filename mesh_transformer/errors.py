"""The one error type for problems a user can cause (bad config, missing or corrupt file, bad request).

Entry points print such an error as one line and exit 1; anything else is a bug and keeps its traceback.
"""

import sys
from collections.abc import Callable
from typing import NoReturn


class UserError(ValueError):
    """A problem with the user's input; the message names the value and what was expected."""


def run_cli(main: Callable[[], int | None]) -> NoReturn:
    """Run a script's main: a UserError becomes `error: ...` on stderr and exit 1, Ctrl-C exits 130."""
    try:
        code = main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
