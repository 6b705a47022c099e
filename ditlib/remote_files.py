"""Large files over HTTP (the official checkpoints, ADM's reference batches): resumable, checked,
and renamed into place only when complete."""
import http.client
import os
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Optional

from ditlib.files import file_digest


class DownloadError(ConnectionError):
    """A pretrained file could not be fetched; the message says where to put it by hand (an OSError,
    so the scripts print it as one line)."""


def copy_response(response, handle, url: str) -> None:
    """An HTTP response's body into an open file with a progress bar; an empty or short body is an error."""
    from tqdm import tqdm

    expected = int(response.headers.get("Content-Length") or 0) or None
    received = 0
    with tqdm(total=expected, unit="B", unit_scale=True, desc=url.rsplit("/", 1)[-1], disable=None) as bar:
        while chunk := response.read(1 << 20):
            handle.write(chunk)
            received += len(chunk)
            bar.update(len(chunk))
    if received == 0:
        raise ValueError("the server sent an empty file")
    if expected is not None and received != expected:
        raise ValueError(f"the connection ended after {received} of {expected} bytes")


def download_file(url: str, target: Path, sha256: Optional[str] = None,
                  check: Optional[Callable[[Path], None]] = None) -> Path:
    """A large file (a checkpoint, ADM's reference batches) fetched to target: resumable (a cut download
    continues from its .part file with an HTTP range request), checked against sha256 and by check (a
    ValueError names the problem) when given, and renamed into place only when complete and checked; a
    complete file that fails a check is deleted. Returns target; a file already there is kept."""
    target = Path(target)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(f".{target.name}.part")
    have = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response, \
                open(part, resume_mode(response, have)) as handle:
            try:
                copy_response(response, handle, url)
            finally:  # what arrived is kept for the next try
                handle.flush()
                os.fsync(handle.fileno())
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as error:
        raise DownloadError(f"could not download {url}: {error}. Rerun later (a cut download continues "
                            f"where it stopped), or place the file at {target.resolve()} yourself") from error
    try:
        if sha256 is not None and file_digest(part) != sha256:
            raise ValueError(f"it does not have the expected SHA-256 {sha256}")
        if check is not None:
            check(part)
    except ValueError as error:
        part.unlink()
        raise DownloadError(f"{url} was downloaded but {error}; the download was deleted. Place a good copy "
                            f"at {target.resolve()} yourself") from error
    os.replace(part, target)
    return target


def resume_mode(response, have: int) -> str:
    """"ab" when the server sends the rest of a file from byte `have` on (206 with a Content-Range
    that starts there), "wb" when it sends the whole file (200, or 206 from byte 0). A 206 from
    elsewhere, or without a Content-Range, would splice wrong bytes into the file: an error."""
    if response.status != 206:
        return "wb"
    header = response.headers.get("Content-Range") or ""
    match = re.match(r"bytes (\d+)-", header)
    start = int(match.group(1)) if match else None
    if start == have:
        return "ab"
    if start == 0:
        return "wb"
    raise ValueError(f"the server answered a request for bytes {have}- with Content-Range {header or 'none'!r}")
