"""Error messages: the one-line form every command prints, and the error that names a wrong setting."""
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


class SettingError(ValueError):
    """A setting has a value the library cannot use. `setting` is its name in the library's
    dataclasses, which is the flag's name with underscores wherever a command has that flag."""

    def __init__(self, setting: str, problem: str):
        super().__init__(f"{setting} {problem}")
        self.setting, self.problem = setting, problem

    def __reduce__(self):  # pickled whole, so rank_zero_decides can raise it on every rank
        return SettingError, (self.setting, self.problem)

    def as_flag(self, flag: str = "") -> ValueError:
        """The same error, naming the setting by `flag` (default: --setting-with-dashes)."""
        flag = flag or "--" + self.setting.replace("_", "-")
        return ValueError(f"{flag}{'' if self.problem.startswith(':') else ' '}{self.problem}")


def first_line(error: BaseException) -> str:
    """The first non-empty line of an error's message (its type's name when it has none)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


@contextmanager
def flag_names(**flags: str) -> Iterator[None]:
    """Name the settings of the library calls inside by these flags (setting=flag) in their errors,
    where a command's flag has another name than the setting it sets."""
    try:
        yield
    except SettingError as error:
        if error.setting not in flags:
            raise
        raise error.as_flag(flags[error.setting]) from None


@contextmanager
def one_line_errors() -> Iterator[None]:
    """A command's body: a mistake in its input ends it with one line naming the problem (a setting
    by its flag), not a traceback."""
    try:
        yield
    except SettingError as error:
        sys.exit(f"{Path(sys.argv[0]).name}: error: {error.as_flag()}")
    except (ValueError, OSError, FloatingPointError, MemoryError) as error:
        sys.exit(f"{Path(sys.argv[0]).name}: error: {error}")


def require_positive(**values) -> None:
    """Each integer setting that is set must be at least 1."""
    for name, value in values.items():
        if value is not None and value < 1:
            raise SettingError(name, f"must be at least 1, got {value}")


def require_non_negative(**values) -> None:
    """Each integer setting must be 0 or more (a count of worker processes, 0: none)."""
    for name, value in values.items():
        if value < 0:
            raise SettingError(name, f"must be 0 or more, got {value}")
