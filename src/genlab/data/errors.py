"""The one error type of bad input files: its message names the file (and line) and the problem."""

from __future__ import annotations

import os


class DataFileError(ValueError):
    """A data file could not be read or is invalid: ``"<path>[:<line>]: <problem>"``."""

    def __init__(self, path: str | os.PathLike[str], problem: str, line: int | None = None):
        self.path = str(path)
        self.line = line
        self.problem = problem
        where = self.path if line is None else f"{self.path}:{line}"
        super().__init__(f"{where}: {problem}")
