"""Fetching channel files over HTTP(S) or from a local folder, resuming where a cut left off.

``ChannelFetcher`` is python-tuf's one-method fetcher interface, so metadata goes through it too.
A dropped connection does not restart a download: the next request asks for ``Range: bytes=N-``
and carries on. ``download_to`` keeps the partial file on disk (named by the caller, normally by
the target's hash), so even an agent restart resumes instead of starting over. Nothing here
trusts what it fetched; TUF checks length and hashes afterwards.
"""

from __future__ import annotations

import logging
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from http.client import HTTPException, IncompleteRead
from pathlib import Path

from tuf.api import exceptions
from tuf.ngclient.fetcher import FetcherInterface

from agent import __version__

log = logging.getLogger(__name__)

CHUNK = 64 * 1024


def is_local(url: str) -> bool:
    return url.startswith("file://") or "://" not in url


def local_path(url: str) -> Path:
    if url.startswith("file://"):
        return Path(urllib.parse.unquote(urllib.parse.urlparse(url).path))
    return Path(url)


class ChannelFetcher(FetcherInterface):
    """HTTP(S) with timeouts, bounded retries and Range resume; ``file://`` and plain paths."""

    def __init__(
        self,
        timeout_s: float = 30.0,
        retries: int = 5,
        backoff_s: float = 0.5,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self._sleep = sleep
        self.bytes_received = 0  # over the network (or disk), all downloads together
        self.resumes = 0

    # -- FetcherInterface ------------------------------------------------------------------------
    def _fetch(self, url: str) -> Iterator[bytes]:
        return self.stream(url, 0)

    # -- the work --------------------------------------------------------------------------------
    def stream(self, url: str, offset: int) -> Iterator[bytes]:
        """Bytes of ``url`` from ``offset`` on; reconnects and resumes after a cut."""
        if is_local(url):
            yield from self._local(url, offset)
            return
        failures = 0
        while True:
            try:
                for chunk in self._http(url, offset):
                    offset += len(chunk)
                    failures = 0  # progress resets the retry budget
                    yield chunk
                return
            except exceptions.DownloadHTTPError:
                raise
            except (OSError, HTTPException) as exc:
                failures += 1
                if failures > self.retries:
                    raise exceptions.DownloadError(
                        f"{url}: gave up after {self.retries} retries: {exc}"
                    ) from None
                delay = min(self.backoff_s * 2 ** (failures - 1), 30.0)
                log.warning("download of %s cut at byte %d (%s); resuming", url, offset, exc)
                self.resumes += 1
                self._sleep(delay)

    def _http(self, url: str, offset: int) -> Iterator[bytes]:
        headers = {"User-Agent": f"edge-agent/{__version__}"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        request = urllib.request.Request(url, headers=headers)
        try:
            response = urllib.request.urlopen(request, timeout=self.timeout_s)
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and offset:
                return  # asked past the end: nothing more to send
            message = f"{url}: HTTP {exc.code} {exc.reason}"
            raise exceptions.DownloadHTTPError(message, exc.code) from None
        with response:
            skip = 0
            if offset and response.status == 200:
                skip = offset  # the server ignored Range: throw away what we already have
            elif offset and response.status == 206:
                content_range = response.headers.get("Content-Range", "")
                if not content_range.startswith(f"bytes {offset}-"):
                    raise exceptions.DownloadError(
                        f"{url}: server resumed at the wrong place ({content_range!r})"
                    )
            announced = response.headers.get("Content-Length")
            received = 0
            while chunk := response.read(CHUNK):
                self.bytes_received += len(chunk)
                received += len(chunk)
                if skip:
                    cut = min(skip, len(chunk))
                    chunk, skip = chunk[cut:], skip - cut
                    if not chunk:
                        continue
                yield chunk
            if announced is not None and received < int(announced):
                # read(n) returns b"" on a closed socket instead of raising: a cut, not an end
                raise IncompleteRead(b"", int(announced) - received)

    def _local(self, url: str, offset: int) -> Iterator[bytes]:
        path = local_path(url)
        try:
            handle = path.open("rb")
        except FileNotFoundError:
            raise exceptions.DownloadHTTPError(f"{path}: not found", 404) from None
        with handle:
            handle.seek(offset)
            while chunk := handle.read(CHUNK):
                self.bytes_received += len(chunk)
                yield chunk

    def download_to(
        self,
        url: str,
        partial: Path,
        length: int,
        progress: Callable[[int], None] | None = None,
    ) -> Path:
        """Fill ``partial`` up to exactly ``length`` bytes, resuming what is already there.

        Raises:
            DownloadLengthMismatchError: the server has more, or fewer, bytes than expected.
            DownloadError: the network gave up.
            OSError: the disk did (full, read-only).
        """
        partial.parent.mkdir(parents=True, exist_ok=True)
        have = partial.stat().st_size if partial.exists() else 0
        if have > length:
            partial.unlink()  # not ours, or a bigger file once sat here: start over
            have = 0
        if have:
            log.info("resuming %s at byte %d of %d", url, have, length)
        with partial.open("ab") as out:
            if have < length:
                # ask for one byte more than expected: a longer file is caught, not truncated
                for chunk in self.stream(url, have):
                    if have + len(chunk) > length:
                        raise exceptions.DownloadLengthMismatchError(
                            f"{url} is longer than its signed length {length}"
                        )
                    out.write(chunk)
                    have += len(chunk)
                    if progress is not None:
                        progress(have)
            out.flush()
            os.fsync(out.fileno())
        if have != length:
            raise exceptions.DownloadLengthMismatchError(
                f"{url} ended after {have} of its signed {length} bytes"
            )
        return partial
