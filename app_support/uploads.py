"""An uploaded file's bytes on disk for the length of a `with`: the project's readers work on files."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def saved_upload(name: str, data: bytes, file_name: str, error: type[Exception]) -> Iterator[Path]:
    """`data` as `file_name` in a private temp folder that lives only inside the `with`, so nothing is left
    behind by a session that goes away. A failed write (a full temp folder) raises `error` naming the
    user's file `name`, never the server's paths."""
    with tempfile.TemporaryDirectory(prefix="upload-") as folder:
        path = Path(folder) / file_name
        try:
            path.write_bytes(data)
        except OSError as err:
            raise error(f"the server could not store {name} to read it: {err.strerror or err}") from None
        yield path
